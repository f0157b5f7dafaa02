"""Device bytes a quantize run's block computations need, measured on the meta device (jobs/meta_peak.py): a block
in training (two whole updates with soft VQ layers: forward, backward, RMSprop step), the teacher's recorded
forward, an evaluation chunk."""
import contextlib
import copy
import math

from vq4dit.jobs.meta_peak import fused_attention


class _FusedAttention:
    """F.scaled_dot_product_attention stand-in for the autograd measurement: a fused kernel (flash or memory-
    efficient, as CUDA runs fp32 attention) keeps q, k, v and the output for backward, never the score matrix, and
    its backward returns the gradients of q, k and v; under `autocast` (jobs.meta_peak.PlannedAutocast) in its
    lower precision."""

    def __init__(self, autocast=None):
        import torch

        self.autocast = autocast

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = fused_attention(q, k, v)
                ctx.save_for_backward(q, k, v, out)
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, _ = ctx.saved_tensors
                return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        self.fn = Fn

    def __call__(self, query, key, value, *args, **kwargs):
        if self.autocast is not None:  # the lower-precision policy of attention (a stand-in is no torch function)
            query, key, value = self.autocast.lower((query, key, value))
        return self.fn.apply(query, key, value)


def _probe_layer(m, codebooks, size, device):
    """A soft VQLinear on meta in place of Linear `m`, nothing frozen (the start of calibration). Its soft weight is
    built as a run on `device` builds it (vq.candidates.soft_reconstruct: einsum's form on a CPU, which keeps the
    (N, n, d) codewords for its backward; the one-pass form elsewhere)."""
    from vq4dit.vq.candidates import soft_reconstruct
    from vq4dit.vq.layer import VQLinear

    class Probe(VQLinear):
        def subvectors(self, dtype=None):
            return soft_reconstruct(self.codebook, self.candidates, self.ratios(), one_pass=device != "cpu")

    return Probe(m.in_features, m.out_features, codebooks.k, codebooks.dim, size["n"], size["groups"],
                 bias=m.bias is not None, device="meta")


def block_training_bytes(block, replay, include_block, sizes, config):
    """(update, share): device bytes of calibrating `block` on the probe call `replay` (calib.replay.Replay) at the
    rows one process computes per update (the batch size of QuantizeConfig `config`; under torchrun a process's
    share of it, calib/balance.py; with micro_batch: at most the micro-batch's rows): `update`, the most that two
    updates hold at once,
    run on meta as calib.train.Trainer runs them, with soft VQ layers in place of the selected Linears
    (`include_block`: their names inside the block): the minibatch's inputs and targets, the forward with
    autograd's saved tensors beside the last update's gradients, L_d and the ratio penalty L_r over every row (as
    at the start), the backward, the gradients summed over the processes under torchrun (utils.distributed.
    GradSync), and RMSprop's step and state (one tensor at a time on a CPU; on a GPU every tensor at once, as
    torch's foreach form runs there); `share`, under torchrun, the inputs and targets of a process's share as the
    cache stores them, on the device for the whole update (calib.shared.SharedLoss), 0 for one process."""
    import torch
    import torch.nn.functional as F

    from vq4dit.calib.calls import flatten
    from vq4dit.calib.capture import storage_dtype
    from vq4dit.calib.replay import batched_reads, gather, squared_error
    from vq4dit.calib.train import ratio_penalty
    from vq4dit.jobs.meta_peak import LiveBytes, PlannedAutocast
    from vq4dit.jobs.plan_sources import plan_device
    from vq4dit.utils import distributed
    from vq4dit.vq.apply import set_submodule

    device, calibration = plan_device(config.device), config.calibration
    student = copy.deepcopy(block)
    for local, full in include_block.items():
        set_submodule(student, local, _probe_layer(student.get_submodule(local), config.codebooks, sizes[full],
                                                   device))
    processes = distributed.launched_sizes()[0]
    share = -(-calibration.batch_size // processes)  # rows a process computes per update (calib.balance)
    rows, batched = min(share, calibration.micro_batch or math.inf), replay.batched
    expanded = {k: t.new_empty((rows, *t.shape[1:])) if batched.get(k, True) else t for k, t in replay.table.items()}
    args, kwargs = gather(replay.call.inputs, expanded, batched, slice(None), "meta")
    with torch.no_grad():
        outputs = flatten(student(*args, **kwargs))[1]
    # under torchrun a process's share of the rows, inputs and targets as the cache stores them, is on the device for
    # the whole update (calib.shared.SharedLoss), its micro-batches cut from it
    per_row = sum(storage_dtype(t, config.cache.dtype).itemsize * t[0].numel()
                  for t in [*batched_reads(replay.call.inputs, replay.table, batched).values(), *outputs])
    share_bytes = share * per_row if processes > 1 else 0
    outputs = [t.shape for t in outputs]  # the targets' shapes
    soft = [student.get_submodule(local) for local in include_block]
    params = [p for layer in soft for p in (layer.logits, layer.codebook, layer.bias) if p is not None]
    if not params:  # no quantized layer: only the end-to-end pass trains through the block, back to the blocks
        # before it, holding what autograd saves for its inputs' gradients
        expanded = {k: t.requires_grad_() if batched.get(k, True) and t.is_floating_point() else t
                    for k, t in expanded.items()}
    optimizer = torch.optim.RMSprop(params, foreach=device != "cpu") if params else None
    sync = distributed.GradSync(collective=None) if processes > 1 else None
    active = [torch.arange(layer.logits.shape[0], device="meta") for layer in soft]  # the free rows: all, at first

    # --step-dtype bf16: the forward under autocast (calib.micro), as the run's device autocasts
    autocast = PlannedAutocast(torch.device(device).type) if calibration.step_dtype == "bf16" else None

    def loss():  # the minibatch's inputs and targets, gathered as calib.blockwise's loss gathers them
        args, kwargs = gather(replay.call.inputs, expanded, batched, slice(None), "meta")
        targets = [torch.empty(shape, device="meta") for shape in outputs]
        with autocast or contextlib.nullcontext():
            return squared_error(flatten(student(*args, **kwargs))[1], targets)[0]

    def update():  # Trainer.step's order: the forward runs beside the last update's gradients (a micro-batch after
        # the first, beside this update's), freed before the backward
        first = loss()
        if optimizer is None:  # no quantized layer (and no L_r)
            first.backward()
            for t in expanded.values():
                t.grad = None  # the inputs' gradients pass on to the block before; nothing keeps them
            return
        optimizer.zero_grad(set_to_none=True)
        (first + calibration.lambda_r * ratio_penalty(soft, calibration.ratio_reg, active)).backward()
        if sync is not None:
            sync.reduce(params, first.detach())
        optimizer.step()

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _FusedAttention(autocast)
    try:
        with torch.enable_grad(), LiveBytes() as counter:
            update()
            update()  # with the first's RMSprop state and gradients held
    finally:
        F.scaled_dot_product_attention = sdpa
    return held_bytes(active) + counter.peak, share_bytes


# jobs.allocation.weight_errors' fits of one Linear at one --bits setting (k-means, decode, difference) hold at most
# about this many bytes per weight (measured by the plan's counter on real fits of the default settings at 0.5 to 8 M
# weights: 25 to 31), plus the nearest-codeword search's distance blocks (DEFAULT_CHUNK x k float32, two at once)
FIT_BYTES_PER_WEIGHT = 32


def allocation_bytes(model, call, rows, per_trajectory, config, linears):
    """(device, host) bytes of --bits' allocation (jobs/allocation.py) beyond the resident model: the larger of the
    weight-error fits (fit_bytes) and the sensitivity probes (probe_bytes); host: the probe calls' inputs. call: the
    plan's model call (args, kwargs) at `rows` rows; linears: per block, the fp32 bytes of each selected Linear."""
    device, host = probe_bytes(model, call, rows, per_trajectory, config, linears)
    return max(fit_bytes(config, linears), device), host


def fit_bytes(config, linears):
    """Device bytes of the weight-error fits (jobs.allocation.weight_errors): the largest Linear at the largest k of
    --bits-settings (FIT_BYTES_PER_WEIGHT)."""
    from vq4dit.vq.allocate import parse_settings
    from vq4dit.vq.nearest import DEFAULT_CHUNK

    largest = max(max(block, default=0) for block in linears)
    k = max(s.k for s in parse_settings(config.codebooks.settings_text))
    return largest // 4 * FIT_BYTES_PER_WEIGHT + DEFAULT_CHUNK * k * 8


def probe_bytes(model, call, rows, per_trajectory, config, linears):
    """(device, host) bytes of the sensitivity probes (calib/sensitivity.py): the model's forward at the probe
    teacher's batch (PROBE_SAMPLES trajectories of `per_trajectory` rows, no gradients), every probe call's reference
    and noisy predictions, and the noise: per block, kept and drawn copies of its Linears in fp32 (--bits-probe
    block), else three copies of the largest Linear; host: the probe calls' inputs (PROBE_STEPS model calls)."""
    from vq4dit.calib.sensitivity import PROBE_SAMPLES, PROBE_STEPS
    from vq4dit.jobs.meta_peak import peak_bytes

    args, kwargs = _with_rows(call, rows, PROBE_SAMPLES * per_trajectory)
    outs = []
    peak = peak_bytes(lambda: outs.append(model(*args, **kwargs)))
    prediction = sum(t.numel() * 4 for t in _tensors(outs))  # fp32, as Probes.predictions keeps them
    largest = max(max(block, default=0) for block in linears)
    noise = max(2 * sum(block) + max(block, default=0) for block in linears) \
        if config.codebooks.bits_probe == "block" else 3 * largest
    inputs = held_bytes((args, kwargs))
    return inputs + peak + 2 * PROBE_STEPS * prediction + noise, PROBE_STEPS * inputs


def _tensors(tree):
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if hasattr(t, "numel")]


def block_key(block, replay, layers):
    """What the device bytes of `block`'s computations on the probe call `replay` depend on: the block's class and
    tensors, the layers it quantizes ({local name: their sizes}), and how it is called (the replayed arguments'
    structure, shapes and dtypes; a batched slot's first dimension is the probe's rows)."""
    from vq4dit.calib.calls import flatten
    from vq4dit.calib.replay import gather

    spec, tensors = flatten(gather(replay.call.inputs, replay.table, replay.batched, slice(None), "meta"))
    held = [(name, tuple(t.shape), t.dtype) for name, t in [*block.named_parameters(), *block.named_buffers()]]
    return (type(block), tuple(held), repr(sorted((name, sorted(size.items())) for name, size in layers.items())),
            repr(spec), tuple((tuple(t.shape), t.dtype) for t in tensors))


def _with_rows(tree, rows, new_rows):
    """`tree` of meta tensors with every tensor of `rows` leading rows grown to `new_rows`."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.new_empty((new_rows, *t.shape[1:])) if getattr(t, "ndim", 0) and t.shape[0] == rows
                    else t, tree)


def held_bytes(tree):
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if hasattr(t, "element_size"))


def record_bytes(model, adapter, plan, call, rows, per_trajectory):
    """Device bytes of the teacher's forward at its sampling batch under the recorder, which keeps every block's
    outputs until the model call ends: the model's inputs and the forward's peak (jobs/meta_peak.py)."""
    from vq4dit.calib.record import recording
    from vq4dit.jobs.meta_peak import peak_bytes

    trajectories = min(plan.batch_size, getattr(adapter, "teacher_batch", plan.batch_size), plan.num_samples)
    args, kwargs = _with_rows(call, rows, trajectories * per_trajectory)

    def forward():
        kept = []
        with recording(model, adapter.blocks(model), lambda step: True, kept.append):
            model(*args, **kwargs)

    return held_bytes((args, kwargs)) + peak_bytes(forward)


def evaluation_bytes(block, replay, points, largest_weight):
    """Device bytes of an evaluation pass's chunk through `block` (calib/chunks.py's rows of the probe Replay
    `replay`, at most the `points` of the calibration set): the chunk's fp32 inputs, the forward's peak, the
    targets' chunk and one decoded weight of `largest_weight` bytes (a hard VQ layer builds its weight to run)."""
    from vq4dit.calib.calls import flatten
    from vq4dit.calib.chunks import replay_chunk
    from vq4dit.calib.replay import gather
    from vq4dit.jobs.meta_peak import peak_bytes

    chunk = min(replay_chunk(replay), points)
    expanded = _with_rows(dict(replay.table), replay.rows, chunk)
    args, kwargs = gather(replay.call.inputs, expanded, replay.batched, slice(None), "meta")
    outs = []
    peak = peak_bytes(lambda: outs.extend(flatten(block(*args, **kwargs))[1]))
    return held_bytes((args, kwargs)) + peak + held_bytes(outs) + largest_weight
