"""Running a diffusers pipeline for the generic adapter (models/adapters/generic.py): the teacher pipeline (text
encoders on the CPU), the probe of its transformer calls, the pipeline on the meta device for the memory plan, and
FirstCallPerStep, which lets calibration record one transformer call per sampler step."""
import torch
from torch import nn

from vq4dit.models.offload import HostBlocks
from vq4dit.models.pipelines import loading_bars, read_index
from vq4dit.utils.device import model_device
from vq4dit.utils.errors import UserError, error_detail


class FirstCallPerStep:
    """Stands for the transformer in a pipeline: the first call at each timestep goes through `module` (its hooks
    see it), later calls at the same timestep (the negative prompt's) call module.forward, which skips them. Every
    other attribute is the module's."""

    def __init__(self, module):
        self.module, self.timestep = module, None

    def __call__(self, *args, **kwargs):
        timestep = kwargs.get("timestep")
        if timestep is None or not _same(timestep, self.timestep):
            self.timestep = timestep
            return self.module(*args, **kwargs)
        return self.module.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _same(a, b):
    """Whether two timestep arguments (tensors or numbers) are equal."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.equal(a, b.to(a.device))
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


class _Stop(Exception):
    """Raised by a hook to end a pipeline call at its first transformer call (the memory plan's probe)."""


def run_probe(pipe, model, blocks, call):
    """pipe(**call) with hooks: ([(args, kwargs)] of every transformer call, [block names in the order the first
    call reached them])."""
    calls, order, inside = [], [], [False]  # inside: a transformer call the hooks see is running

    def on_model(module, args, kwargs):
        calls.append((args, kwargs))
        inside[0] = True

    def after_model(module, args, kwargs, output):
        inside[0] = False

    def on_block(name):
        def hook(module, args, kwargs):
            if inside[0] and len(calls) == 1:
                order.append(name)
        return hook

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True),
               model.register_forward_hook(after_model, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(on_block(name), with_kwargs=True) for name, block in blocks]
    try:
        with torch.no_grad():
            pipe(**call)
    finally:
        for handle in handles:
            handle.remove()
    return calls, order


def map_tensors(value, fn):
    """`value` (nested tuples, lists, dicts, transformers' ModelOutput) with fn applied to every tensor."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = map_tensors(value[key], fn)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def on_cpu(module, device):
    """Run `module` (kept on the CPU) for a pipeline executing on `device`: inputs to the CPU, outputs back."""
    module.register_forward_pre_hook(lambda m, args, kwargs: map_tensors((args, kwargs), lambda t: t.to("cpu")),
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, args, kwargs, output: map_tensors(output, lambda t: t.to(device)),
                                 with_kwargs=True)


def pin_execution_device(pipe, device):
    """Make `pipe` run on `device` whatever its components' devices (diffusers takes the first component's)."""
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: torch.device(device))})


def layer_lists(module):
    """[(qualified name, layer)] of the items of `module`'s outermost nn.ModuleLists whose every item holds two or
    more Linears (a text encoder's transformer layers), in declaration order."""
    out, taken = [], []
    for name, child in module.named_modules():
        if (isinstance(child, nn.ModuleList) and len(child) and not any(name.startswith(f"{t}.") for t in taken)
                and all(sum(isinstance(m, nn.Linear) for m in item.modules()) >= 2 for item in child)):
            taken.append(name)
            out += [(f"{name}.{i}", item) for i, item in enumerate(child)]
    return out


def teacher_pipeline(directory, model, text_encoders=True):
    """The pipeline at `directory` with `model` as its transformer, executing on the model's device; its other
    models on the CPU in fp32: the VAE upcast, the text encoders computing in fp32 from their weights as stored (their
    layers upcast one at a time while they run, models/offload.HostBlocks: bf16 to fp32 is exact, so they compute what
    the encoders upcast whole compute, holding half the bytes where the files store bf16). text_encoders=False: the
    text encoders built on the meta device instead (no weight read), answering zeros of their output shapes
    (shapes_only): for a pipeline whose encode_prompt is given its results (models/adapters/encode_replay.py)."""
    import diffusers
    import transformers

    device = model_device(model)
    index = read_index(directory)
    name = index["_class_name"]
    stand_ins = {} if text_encoders else {k: meta_component(directory, k, entry) for k, entry in index.items()
                                           if k.startswith("text_encoder") and isinstance(entry, list) and entry[0]}
    try:
        with loading_bars():
            pipe = getattr(diffusers, name).from_pretrained(str(directory), transformer=model, **stand_ins)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{directory}: cannot load the {name} pipeline ({error_detail(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    for key, component in pipe.components.items():
        if isinstance(component, nn.Module) and component is not model:
            if key.startswith("text_encoder") and text_encoders and isinstance(component, transformers.PreTrainedModel):
                HostBlocks(component, layer_lists(component), "cpu")  # lives as long as the encoder (its hooks)
            else:
                component.float()
            if device.type != "cpu":
                on_cpu(component, device)
    if device.type != "cpu" or stand_ins:  # diffusers would run on the first component's device (meta: a stand-in)
        pin_execution_device(pipe, device)
    return pipe


def shapes_only(encoder):
    """Make a text encoder built on the meta device answer with zeros on the CPU of the shapes it would return:
    its own meta forward where that runs, else (last_hidden_state, hidden_states) of (B, T, hidden size) from its
    config (a forward that reads data, e.g. transformers' causal masks, cannot run on meta)."""
    from transformers.modeling_outputs import BaseModelOutput

    run = encoder.forward

    def forward(*args, **kwargs):
        try:
            out = run(*map_tensors(list(args), lambda t: t.to("meta")), **map_tensors(kwargs, lambda t: t.to("meta")))
        except (RuntimeError, NotImplementedError):
            config = getattr(encoder.config, "text_config", encoder.config)
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            width = getattr(config, "hidden_size", None) or config.d_model
            hidden = torch.zeros(*ids.shape, width)
            layers = getattr(config, "num_hidden_layers", None) or config.num_layers
            return BaseModelOutput(last_hidden_state=hidden, hidden_states=(hidden,) * (layers + 1))
        return map_tensors(out, lambda t: torch.zeros(t.shape, dtype=t.dtype))

    encoder.forward = forward
    return encoder


def meta_component(directory, name, entry):
    """Component `name` of the pipeline at `directory` (its model_index.json `entry`: [library, class]) built on the
    meta device from its config: a diffusers model as is, a transformers model answering zeros (shapes_only); None
    for anything else (tokenizers, schedulers: loaded from their files)."""
    import diffusers
    import transformers

    cls = getattr(diffusers if entry[0] == "diffusers" else transformers, entry[1], None)
    with torch.device("meta"):
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            return cls.from_config(cls.load_config(str(directory), subfolder=name))
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return shapes_only(cls._from_config(transformers.AutoConfig.from_pretrained(str(directory),
                                                                                        subfolder=name)))
    return None


def meta_pipeline(directory, model):
    """The pipeline at `directory` executing on the CPU, with every model component built on the meta device from its
    config (`model` as the transformer; text encoders answering zeros of their output shapes); tokenizers and
    scheduler loaded from their files. No weight is read."""
    import diffusers

    index = read_index(directory)
    components = {"transformer": model}
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not (isinstance(entry, list) and entry[0]):
            continue
        component = meta_component(directory, name, entry)
        if component is not None:
            components[name] = component
    with loading_bars():
        pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(directory), **components)
    pipe.set_progress_bar_config(disable=True)
    pin_execution_device(pipe, "cpu")
    return pipe


def until_transformer(model, run):
    """run() (a pipeline call), stopped at its first call of `model` (before any hook registered earlier sees it);
    returns (args, kwargs) of that call, or None when the pipeline never called its transformer."""
    seen = []

    def stop(module, args, kwargs):
        seen.append((list(args), kwargs))
        raise _Stop

    handle = model.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def first_call(pipe, model, call):
    """(args, kwargs) of the pipeline's first transformer call, moved to the meta device (the meta model never
    runs here: the call is stopped before it)."""
    seen = until_transformer(model, lambda: pipe(**call))
    if seen is None:
        raise UserError(f"the {type(pipe).__name__} pipeline never called its transformer")
    return map_tensors(seen, lambda t: t.to("meta"))


def call_order(model, blocks, args, kwargs):
    """Names of `blocks` [(name, module)] in the order model(*args, **kwargs) first calls them."""
    order = []
    handles = [b.register_forward_pre_hook(lambda m, a, name=name: order.append(name)) for name, b in blocks]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))
