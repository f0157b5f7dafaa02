"""Device bytes a quantize run's block computations need, measured on the meta device (jobs/meta_peak.py): a block
in training (autograd's saved tensors with soft VQ layers), the teacher's recorded forward, an evaluation chunk."""
import copy
import math

from vq4dit.jobs.meta_peak import fused_attention


class _FusedAttention:
    """F.scaled_dot_product_attention stand-in for the autograd measurement: a fused kernel (flash or memory-
    efficient, as CUDA runs fp32 attention) keeps q, k, v and the output for backward, never the score matrix."""

    def __init__(self):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = fused_attention(q, k, v)
                ctx.save_for_backward(q, k, v, out)
                return out

            @staticmethod
            def backward(ctx, grad):
                raise RuntimeError("shape probe only")

        self.fn = Fn

    def __call__(self, query, key, value, *args, **kwargs):
        return self.fn.apply(query, key, value)


def _probe_layer(m, codebooks, size, device):
    """A soft VQLinear on meta in place of Linear `m`; its ratios are the softmax of its logits (the start of
    calibration, nothing frozen: the check for frozen rows would read data meta tensors do not hold). Its soft
    weight is built as a run on `device` builds it (vq.candidates.soft_reconstruct: einsum's form on a CPU, which
    keeps the (N, n, d) codewords for its backward; the one-pass form elsewhere)."""
    import torch

    from vq4dit.vq.candidates import soft_reconstruct
    from vq4dit.vq.layer import VQLinear

    class Probe(VQLinear):
        def ratios(self):
            return torch.softmax(self.logits, dim=1)

        def subvectors(self, dtype=None):
            return soft_reconstruct(self.codebook, self.candidates, self.ratios(), one_pass=device != "cpu")

    return Probe(m.in_features, m.out_features, codebooks.k, codebooks.dim, size["n"], size["groups"],
                 bias=m.bias is not None, device="meta")


def block_training_bytes(block, replay, include_block, sizes, config):
    """Device bytes of calibrating `block` on the probe call `replay` (calib.replay.Replay) at the batch size of
    QuantizeConfig `config` (with micro_batch: at the micro-batch's rows): autograd's saved activations with soft
    VQ layers in place of the selected Linears (`include_block`: their names inside the block) and of the ratio
    penalty L_r over their free rows (every row at the start, and the rows' index), the minibatch's inputs and
    targets in fp32, and the gradients and RMSprop state of the VQ parameters (logits, codebooks, biases)."""
    import torch
    import torch.nn.functional as F

    from vq4dit.calib.calls import flatten
    from vq4dit.calib.replay import gather
    from vq4dit.calib.train import ratio_penalty
    from vq4dit.jobs.plan_sources import plan_device
    from vq4dit.vq.apply import set_submodule

    student = copy.deepcopy(block)
    for local, full in include_block.items():
        set_submodule(student, local, _probe_layer(student.get_submodule(local), config.codebooks, sizes[full],
                                                   plan_device(config.device)))
    rows, batched = min(config.calibration.batch_size, config.calibration.micro_batch or math.inf), replay.batched
    expanded = {k: t.new_empty((rows, *t.shape[1:])) if batched.get(k, True) else t for k, t in replay.table.items()}
    args, kwargs = gather(replay.call.inputs, expanded, batched, slice(None), "meta")
    owned = {t.untyped_storage()._cdata for t in [*student.parameters(), *student.buffers()]}
    inputs = [t for t in flatten((args, kwargs))[1] if t.is_floating_point()]
    held = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in inputs}  # the minibatch, and what
    # autograd keeps (a tensor counts once however often it is saved)

    def pack(t):
        if t.untyped_storage()._cdata not in owned:
            held[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    soft = [student.get_submodule(local) for local in include_block]
    active = [torch.arange(layer.logits.shape[0], device="meta") for layer in soft]  # the free rows: all, at first
    held.update({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in active})
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _FusedAttention()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = flatten(student(*args, **kwargs))[1]
            ratio_penalty(soft, config.calibration.ratio_reg, active)  # L_r: what its backward keeps, per layer
    finally:
        F.scaled_dot_product_attention = sdpa
    targets = sum(t.numel() * 4 for t in outputs)
    optimizer = sum(2 * (sizes[f]["subs"] * sizes[f]["n"] * 4 + sizes[f]["fixed"]) for f in include_block.values())
    return sum(held.values()) + targets + optimizer


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
