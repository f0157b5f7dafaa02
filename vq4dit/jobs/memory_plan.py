"""The memory plan of a quantize run on a text-to-image transformer, by shape arithmetic on the meta device.

The model is built from its config with every tensor on the meta device (no memory, no weights) and called once
under the same hooks that record a real run (calib/record.py), so the plan sees exactly the block calls, slot
tensors and block outputs a recording stores. From them, at the config's settings:
- host memory: the calibration set (slot tensors at calib_samples x kept steps x CFG rows; token activations in
  cache_dtype; beyond max_cache_gb they go to files under cache_dir) and the block-wise walk's peak: the slots that
  later blocks still read plus block i's FP targets and the quantized chain's outputs (two sets per stream);
- device memory: the FP teacher, the student (hard layers: indices and fp32 codebook; the layers under calibration
  soft: candidates, ratio logits, frozen flags; block-wise that is one block at a time, joint and online every
  layer from the start) and the block being calibrated: gradients and RMSprop state of its VQ parameters,
  its minibatch (inputs and targets in fp32) and the activations autograd keeps at batch_size, measured by running
  the block on meta with soft VQ layers and attention as a fused kernel keeps it (q, k, v, output);
- the artifact: every stored tensor's bytes from its codec (vq/codecs.py), and bits per quantized weight;
- each stage's device and host peak (jobs/plan_stages.py), with the transients: building the quantized layers
  holds the teacher copy and the old layers until the build ends; the recorder keeps every block's outputs for
  the whole teacher forward at its sampling batch (measured on meta, jobs/meta_peak.py); an evaluation pass holds
  one chunk of rows (calib/chunks.py) through a block and its forward's peak (measured on meta); output-aware
  starts hold a block's input moments (float64, in x in per layer); the text encoders (in their config's dtype)
  encode the prompts on the CPU before the teacher runs.
Not counted: k-means temporaries, the CUDA allocator's slack and the CUDA libraries' host memory.
"""
import dataclasses
from dataclasses import dataclass

from vq4dit.calib.modes import mode_for
from vq4dit.jobs.plan_layers import layer_sizes
from vq4dit.jobs.plan_probes import allocation_bytes, block_key, block_training_bytes, evaluation_bytes, record_bytes
from vq4dit.jobs.plan_sources import (
    REFERENCE_MODELS,
    dit_source,
    meta_dit,
    meta_model,
    pipeline_classes,
    plan_device,
    plan_source,
    plans_stream,
    stored_bytes,
    stored_is_mapped,
    text_encoder_bytes,
)
from vq4dit.utils import distributed

GIB = 2**30
PROBE_ROWS = 3  # batch rows of the shape probe (no other dimension of these models is 3)


@dataclass
class MemoryPlan:
    title: str
    points: str  # how the calibration rows come about
    slots: list  # [(key, stored shape, bytes)]
    cache_bytes: int  # the recorded calibration set (host)
    walk_blocks: list  # the block-wise walk's peak while each block is calibrated (host)
    teacher_bytes: int  # device: the FP teacher
    student_bytes: int  # device: the student, its layers soft while calibrated (block-wise: one block at a time)
    hard_bytes: int  # the student once every layer is hard
    block_bytes: int  # device: calibrating the largest block
    pass_bytes: int  # device: the end-to-end pass (every block's activations at once), 0 without one
    artifact_bytes: int  # tensor bytes of model.safetensors
    fp_bytes: int  # the transformer's tensors in fp32
    bits: float  # bits per quantized weight, indices only
    bits_with_codebooks: float
    weights: int  # quantized weights
    layers: int  # quantized Linears
    peaks: object = None  # plan_stages.PlanPeaks
    stream: bool = False  # the peaks are a streamed run's (jobs/streaming.py)
    stream_flag: str = "off"  # the config's --stream
    stored_bytes: int = 0  # host: the transformer as its checkpoint stores it
    block_fp_bytes: int = 0  # device: the largest block in fp32
    inputs: object = None  # the plan_stages.StageInputs the peaks come from

    @property
    def walk_bytes(self):
        return max(self.walk_blocks)

    @property
    def device_bytes(self):
        return self.teacher_bytes + self.student_bytes + self.block_bytes

    def machine_line(self):
        """This machine's host memory under torchrun, at its worst stage (plan_stages.PlanPeaks.machine_host)."""
        worst = self.peaks.machine_host_peak
        n, mapped = self.peaks.processes_here, worst.mapped_bytes
        parts = [f"{n} processes x {(worst.host_bytes - mapped - worst.rank0_bytes) / GIB:.2f} GiB each"]
        if worst.rank0_bytes:
            parts.append(f"the text encoders once (rank 0 encodes the prompts) {worst.rank0_bytes / GIB:.2f} GiB")
        if mapped:
            parts.append(f"the teacher's checkpoint pages once (mapped by every process) {mapped / GIB:.2f} GiB")
        return (f"  this machine's host memory: {self.peaks.machine_host(worst) / GIB:.2f} GiB at {worst.name} = "
                + " + ".join(parts))

    def format(self):
        def gib(n):
            return f"{n / GIB:.2f} GiB"

        lines = [f"memory plan: {self.title}", f"  calibration set: {self.points}",
                 f"  host: recorded activations {gib(self.cache_bytes)}, block-wise walk peak {gib(self.walk_bytes)}"
                 " (past max_cache_gb they go to files in cache_dir)"]
        lines += [f"    {key} {tuple(shape)}: {gib(nbytes)}" for key, shape, nbytes in self.slots]
        lines += [f"  device: FP teacher {gib(self.teacher_bytes)} + student {gib(self.student_bytes)} (layers soft "
                  f"while calibrated; {gib(self.hard_bytes)} all hard) + calibrating one block "
                  f"{gib(self.block_bytes)} = {gib(self.device_bytes)} (text encoders: on the CPU, before calibration)"]
        if self.pass_bytes:
            total = self.teacher_bytes + self.hard_bytes + self.pass_bytes
            lines.append(f"  device, end-to-end pass: FP teacher + student (all hard) + every block trained at once "
                         f"{gib(self.pass_bytes)} (at most: counted with soft layers) = {gib(total)}")
        lines.append(f"  artifact: {self.artifact_bytes / 1e9:.3f} GB (fp32: {self.fp_bytes / 1e9:.2f} GB); "
                     f"{self.layers} quantized Linears, {self.weights / 1e9:.3f} B weights at {self.bits:.3f} bits "
                     f"({self.bits_with_codebooks:.3f} with fp16 codebooks)")
        streamed = (f"the teacher on the host as stored {gib(self.stored_bytes)}, one block in fp32 on the device at "
                    f"a time (largest {gib(self.block_fp_bytes)}; on a GPU the next one staged as stored beside it)")
        if self.stream:
            lines.append(f"  streamed (--stream {self.stream_flag}): {streamed}")
        else:
            auto = "; auto streams where the CUDA device holds less than the device peak" * (self.stream_flag == "auto")
            lines.append(f"  not streamed (--stream {self.stream_flag}{auto}); --stream on would keep {streamed}")
        if self.peaks is not None:
            lines.append(self.peaks.format())
            if self.peaks.processes_here > 1:
                lines.append(self.machine_line())
        return "\n".join(lines)


def dry_run_plan(config, json_path=None):
    """The formatted plan of QuantizeConfig `config` (plan_for), None where there is none; `json_path`: the stage
    peaks (plan_stages.PlanPeaks) also written there as JSON."""
    plan = plan_for(config)
    return None if plan is None else _finish(plan, config, json_path)


def plan_for(config):
    """The MemoryPlan of QuantizeConfig `config` when its ckpt is a text-to-image pipeline (a local directory or a hub
    id of REFERENCE_MODELS) of a supported class or a DiT (dit_source), and its method builds codebooks, else None.
    Loads no weights and fetches nothing."""
    source = plan_source(config.model.ckpt)  # a --ckpt that does not exist: a UserError
    if config.method == "rtn":
        return None
    from vq4dit.jobs.plan_stages import runtime_bytes

    dit = dit_source(config.model) if source is None and config.model.backend != "diffusers" else None
    # measured before the plan's own work grows this process, with the pipeline's libraries imported
    runtime = runtime_bytes(pipeline_classes(source[3] if source else None))
    if dit is not None:
        from vq4dit.models.adapters.dit import DiTAdapter

        return memory_plan(Planned(meta_dit(dit[0]), DiTAdapter(), dit[1]), config, runtime)
    if source is None:
        return None
    from vq4dit.models.adapters import ADAPTERS
    from vq4dit.models.adapters.generic import GenericAdapter
    from vq4dit.models.adapters.t2i import TextToImageAdapter

    name, model_config, factor, directory = source
    adapter = ADAPTERS[name]() if name in ADAPTERS else GenericAdapter() if directory else None
    if not isinstance(adapter, TextToImageAdapter):
        return None
    if directory is not None:
        spec = config.model
        adapter.bind({"pipeline": {"source": str(directory)}}, height=spec.height, width=spec.width,
                     num_frames=spec.num_frames)
    tokens = adapter.prompt_tokens(directory) if directory else adapter.text_tokens
    return memory_plan(Planned(meta_model(name, model_config), adapter, factor, tokens, directory), config, runtime)


def _finish(plan, config, json_path):
    """The text of MemoryPlan `plan`; its peaks written to `json_path` (when given) as JSON."""
    if json_path is not None:
        plan.peaks.write_json(json_path, plan.title)
    text = plan.format()
    if not mode_for(config.calibration.calib).walks_blocks:
        text += (f"\n  note: the host figures are the block-wise walk's; calib {config.calibration.calib} holds other "
                 "tensors, and its error passes run the whole chain (calib/chunks.py chain_chunk), planned as one "
                 "block's")
    return text


@dataclass(frozen=True)
class Planned:
    """What a plan is of: `model` (on meta) described by `adapter`, its VAE's pixels per latent pixel `vae_factor`,
    `tokens` prompt tokens, and `directory`, the pipeline's, whose text encoders the plan counts (None: none)."""

    model: object
    adapter: object
    vae_factor: int
    tokens: int = 0
    directory: object = None


def memory_plan(planned, config, runtime=None):
    """The MemoryPlan of quantizing Planned `planned` with QuantizeConfig `config`; images of the model spec's height x
    width (None: the pipeline's default); `runtime`: the run's process bytes (plan_stages.runtime_bytes; None:
    measured now)."""
    import torch

    from vq4dit.calib.capture import calib_steps, storage_dtype
    from vq4dit.calib.config import TeacherConfig
    from vq4dit.calib.endpass import spaced_rows
    from vq4dit.calib.record import recording, slot_is_batched
    from vq4dit.calib.replay import Replay
    from vq4dit.calib.tables import Out
    from vq4dit.calib.teacher import largest_share, recorded_rows
    from vq4dit.calib.walk import WalkPlan, walk_peaks
    from vq4dit.jobs.keys_read import ignored_keys
    from vq4dit.jobs.methods import method_for
    from vq4dit.jobs.plan_stages import StageInputs, runtime_bytes, stages
    from vq4dit.models.adapters.base import selected_pattern

    model, adapter, vae_factor, tokens, directory = (planned.model, planned.adapter, planned.vae_factor,
                                                     planned.tokens, planned.directory)
    spec, codebooks, mode = config.model, config.codebooks, mode_for(config.calibration.calib)
    plan = mode.teacher_plan(config.teacher, config.seed)
    height, width, probe_rows, args, kwargs = adapter.plan_call(model, plan, vae_factor, (spec.height, spec.width),
                                                                tokens, PROBE_ROWS)
    per_trajectory = adapter.rows_per_trajectory(plan)
    # a calib_timesteps the run does not read (--calib online, --bits without calibration: jobs.keys_read) does not
    # move the plan, which takes the default there, at most every step; where it is read validate() holds it there
    read = "calib_timesteps" not in ignored_keys(config)
    timesteps = min(config.teacher.calib_timesteps if read else TeacherConfig.calib_timesteps, plan.steps)
    kept = len(calib_steps(plan.steps, timesteps))
    rows = all_rows = recorded_rows(plan, timesteps, per_trajectory)
    processes, on_this_machine = distributed.launched_sizes()
    end_rows = len(spaced_rows(all_rows))  # the end-to-end pass's points (of this process, below)
    if processes > 1:  # under torchrun each process records, walks and evaluates its own share of the points
        rows = largest_share(plan, kept, per_trajectory, processes)
        end_rows = largest_share(plan, kept, per_trajectory, processes, spaced_rows(all_rows).numpy())
    calls = []
    with torch.no_grad(), recording(model, adapter.blocks(model), lambda step: True, calls.append,
                                            keep_outputs=True):
        model(*args, **kwargs)
    live, cache_dtype = calls[0], config.cache.dtype

    def stored(key, t):  # the probe slot as the cache stores it, on meta (constant slots as they came)
        shape, dtype = ((rows, *t.shape[1:]), storage_dtype(t, cache_dtype)) if batched[key] else (t.shape, t.dtype)
        return torch.empty(shape, dtype=dtype, device="meta")

    batched = {key: slot_is_batched(t, probe_rows) for key, t in live.slots.items()}
    stored_slots = {key: stored(key, t) for key, t in live.slots.items()}
    slots = [(key, tuple(t.shape), t.numel() * t.element_size()) for key, t in stored_slots.items()]
    walk_plan = WalkPlan(live.calls, batched, rows, mode.sequential(config.calibration))
    walk = walk_peaks(walk_plan, stored_slots, live.outputs, cache_dtype)

    include = selected_pattern(adapter, model, spec.include, spec.exclude)
    sizes = layer_sizes(model, include, codebooks, method_for(config.method, codebooks).candidates)
    table = dict(live.slots)
    for i, outs in enumerate(live.outputs):
        table.update({Out(i, k): t for k, t in enumerate(outs)})
    batched.update({ref: True for ref in table if isinstance(ref, Out)})
    block_bytes, evaluate, soft, moments, fp_blocks, measured, linears = [], [], [], [], [], {}, []
    updates, shares = [], []  # per block: the update's bytes, a torchrun process's share (block_training_bytes)
    for i, (name, block) in enumerate(adapter.blocks(model)):
        fp_blocks.append(sum(p.numel() * 4 for p in block.parameters()) + sum(b.numel() * b.element_size()
                                                                             for b in block.buffers()))
        inside = {full[len(name) + 1:]: full for full in sizes if full.startswith(f"{name}.")}
        linears.append([sizes[full]["fp"] for full in inside.values()])
        replay = Replay(live.calls[i], table, batched, PROBE_ROWS)
        largest = max([sizes[f]["fp"] for f in inside.values()], default=0)
        key = block_key(block, replay, {local: sizes[full] for local, full in inside.items()})
        if key not in measured:  # blocks of one shape, called alike, are measured once
            measured[key] = (block_training_bytes(block, replay, inside, sizes, config),
                             evaluation_bytes(block, replay, rows, largest))
        (update, share), _ = measured[key]
        updates.append(update)  # a block with no quantized layer: what the end-to-end pass holds through it
        shares.append(share)
        block_bytes.append(update + share if inside else 0)  # ... and no update of its own in the walk
        evaluate.append(measured[key][1])
        soft.append(sum(sizes[f]["soft"] - sizes[f]["hard"] for f in inside.values()))
        moments.append(sum(block.get_submodule(local).in_features ** 2 * 8 for local in inside)
                       if config.output_aware and mode.walks_blocks else 0)
    state = model.state_dict()  # what the artifact stores: parameters and persistent buffers
    fp_bytes = sum(t.numel() * 4 for t in state.values())
    teacher = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                   for b in model.buffers())
    kept_fp = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for key, t in state.items()
                  if not key.startswith(tuple(f"{name}." for name in sizes)))
    total = {key: sum(s[key] for s in sizes.values()) for key in ("weights", "fp", "soft", "hard", "stored",
                                                                    "index", "codebook")}
    resident = teacher - total["fp"]  # the student's full-precision tensors
    soft_extra = total["soft"] - total["hard"]  # joint / online: every layer soft from the start
    if mode.walks_blocks:  # block-wise: a block's layers are soft only while it is calibrated
        soft_extra = max(sum(s["soft"] - s["hard"] for full, s in sizes.items() if full.startswith(f"{name}."))
                         for name, _ in adapter.blocks(model))
    guidance = "CFG doubles the batch" if per_trajectory == 2 else "no CFG batch"
    pipeline = directory is not None or spec.ckpt in REFERENCE_MODELS
    # the pass: every block's activations at once, and one share of the chain's inputs and targets under torchrun
    end_pass = sum(updates) + max(shares) if config.calibration.e2e_iters else 0
    bits = (0, 0) if codebooks.bits is None else allocation_bytes(model, (args, kwargs), probe_rows, per_trajectory,
                                                                  config, linears)
    inputs = StageInputs(
        teacher=teacher, hard=resident + total["hard"], quantized_hard=total["hard"],
        text_encoders=text_encoder_bytes(directory, getattr(adapter, "encoders_by_layer", False)),
        record=record_bytes(model, adapter, plan, (args, kwargs), probe_rows, per_trajectory),
        cache=sum(n for _, _, n in slots), walk=walk, soft=soft, train=block_bytes,
        evaluate=evaluate, moments=moments, end_pass=end_pass,
        end_points=2 * sum(n for _, _, n in slots) * end_rows // rows if end_pass else 0,
        artifact=kept_fp + total["stored"], names=[name for name, _ in adapter.blocks(model)],
        walks_blocks=mode.walks_blocks, fp_blocks=fp_blocks,
        stored=stored_bytes(model, pipeline, directory), stored_mapped=stored_is_mapped(pipeline, directory),
        encode_on_rank0=getattr(adapter, "encodes_once", False),
        processes_here=on_this_machine if processes > 1 else 1, bits=bits[0], bits_host=bits[1])
    runtime = runtime_bytes(pipeline_classes(directory)) if runtime is None else runtime
    device = plan_device(config.device)
    peaks = stages(inputs, device, runtime)
    stream = plans_stream(config.stream, device, peaks)
    if stream:
        peaks = stages(dataclasses.replace(inputs, stream=True), device, runtime)
    return MemoryPlan(
        title=f"{type(model).__name__} ({len(live.calls)} blocks) at {height}x{width}, {codebooks.label()}, cache "
              f"{config.cache.cache_dtype}, batch {config.calibration.batch_size}",
        points=f"{plan.num_samples} trajectories x {kept} steps x {per_trajectory} ({guidance}) = {all_rows} points"
               + (f"; each of the {processes} processes (torchrun) holds at most {rows} of them, and every figure "
                  "below is one process's" if processes > 1 else ""),
        slots=slots, cache_bytes=sum(size for _, _, size in slots), walk_blocks=walk, teacher_bytes=teacher,
        student_bytes=resident + total["hard"] + soft_extra, hard_bytes=resident + total["hard"],
        block_bytes=max(block_bytes), pass_bytes=end_pass,
        artifact_bytes=kept_fp + total["stored"], fp_bytes=fp_bytes, bits=total["index"] * 8 / total["weights"],
        bits_with_codebooks=(total["index"] + total["codebook"]) * 8 / total["weights"], weights=total["weights"],
        layers=len(sizes), peaks=peaks, stream=stream, stream_flag=config.stream, stored_bytes=inputs.stored,
        block_fp_bytes=max(fp_blocks), inputs=inputs)

