"""The most bytes a computation holds at once, measured on the meta device (jobs/meta_peak.py), against counts made
by hand."""
import pytest
import torch
import torch.nn.functional as F

from vq4dit.jobs.meta_peak import peak_bytes


def test_peak_counts_what_is_alive_together_and_views_once():
    """x (N, H) fp32: y = 2x; z = y + 1 (y and z alive); y freed; w = 3z (z and w). The peak is two tensors, not
    three: catches freed tensors never subtracted; y.t() shares y's storage: counted once."""
    x = torch.empty(64, 32, device="meta")
    size = 64 * 32 * 4

    def fn():
        y = x * 2
        view = y.t()
        z = y + 1
        del y, view
        w = z * 3
        return w

    assert peak_bytes(fn) == 2 * size


def test_attention_is_counted_as_a_fused_kernel_keeps_it():
    """Attention over T tokens keeps its output, never the (B, heads, T, T) score matrix: catches the math
    fallback's 4608 x 4608 scores per head (2 GiB a row for Flux-dev) counted."""
    q = torch.empty(1, 24, 4608, 128, device="meta")
    peak = peak_bytes(lambda: F.scaled_dot_product_attention(q, q, q))
    assert peak == q.numel() * 4
    assert F.scaled_dot_product_attention is not None  # restored after the measurement
    assert F.scaled_dot_product_attention.__module__ != "vq4dit.jobs.meta_peak"


def test_an_in_place_update_or_a_view_of_a_tensor_from_before_creates_nothing():
    """A weight updated in place (an optimizer's step, a probe's noise) and a view of it held: nothing new; one new
    tensor beside them counts. The counter took the weight's whole storage as new (mutation: inputs' storages not
    told apart -> twice the size), which made a real update seem to hold its parameters twice."""
    w = torch.empty(64, 32, device="meta")
    size = 64 * 32 * 4

    def fn():
        w.add_(1)
        view = w.t()
        fresh = w * 2
        return view, fresh

    assert peak_bytes(fn) == size


AUTOCAST_CASES = {  # an op of each kind a block runs, on float32 and bfloat16 inputs
    "linear": lambda x, w, b: F.linear(x, w, b),
    "matmul": lambda x, w, b: x @ w.t(),
    "bmm": lambda x, w, b: torch.bmm(x, w.t().expand(x.shape[0], -1, -1)),
    "einsum": lambda x, w, b: torch.einsum("bti,oi->bto", x, w),
    "attention": lambda x, w, b: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None]),
    "matrix-vector": lambda x, w, b: torch.mv(w, x[0, 0]),  # CUDA's list only
    "layer_norm": lambda x, w, b: F.layer_norm(x.bfloat16(), (8,)),
    "rms_norm": lambda x, w, b: F.rms_norm(x.bfloat16(), (8,)),
    "mse_loss": lambda x, w, b: F.mse_loss(x.bfloat16(), x),
    "mixed add": lambda x, w, b: x.bfloat16() + x,
    "gelu": lambda x, w, b: F.gelu(x.bfloat16()),
}


@pytest.mark.parametrize("case", AUTOCAST_CASES)
def test_planned_autocast_casts_as_torch_autocast_does_on_the_cpu(case):
    """The plan's stand-in for autocast on meta (jobs.meta_peak.PlannedAutocast, here on real CPU tensors) against
    torch.autocast on the CPU: each op's output dtype is autocast's, and gradients reach the float32 weights in
    float32. Mutations that fail it: an op left out of the lower-precision list (linear: float32 out); the CPU
    given CUDA's lists (layer_norm, rms_norm: float32 out; mv: bfloat16 out). What autograd keeps of the casts:
    test_memory_plan_vs_runs.py's bf16 cases."""
    from vq4dit.jobs.meta_peak import PlannedAutocast

    fn, x = AUTOCAST_CASES[case], torch.randn(2, 3, 8)
    outs = []
    for context in (torch.autocast("cpu", dtype=torch.bfloat16), PlannedAutocast("cpu")):
        w, b = torch.randn(8, 8, requires_grad=True), torch.randn(8, requires_grad=True)
        with context:
            out = fn(x, w, b)
        if out.requires_grad:
            out.float().sum().backward()
        outs.append((out.dtype, None if w.grad is None else w.grad.dtype))
    assert outs[0] == outs[1]


def test_planned_autocast_on_cuda_runs_norms_in_float32_and_attention_inputs_low():
    """CUDA's lists (autocast_mode.h: layer_norm, rms_norm, softmax, upsampling in float32), and the plan's
    attention stand-in (jobs.plan_probes._FusedAttention) casting a float32 query, as autocast casts a fused
    attention's inputs: its output is what autograd keeps. Mutations that fail it: one list for both devices;
    rms_norm left out (the review); the stand-in not casting."""
    from vq4dit.jobs.meta_peak import PlannedAutocast
    from vq4dit.jobs.plan_probes import _FusedAttention

    autocast, x = PlannedAutocast("cuda"), torch.randn(2, 3, 8)
    with autocast:
        assert F.layer_norm(x.bfloat16(), (8,)).dtype == torch.float32
        assert F.rms_norm(x.bfloat16(), (8,)).dtype == torch.float32  # the review: Flux's and Wan's q/k norms
        assert F.interpolate(x.bfloat16(), scale_factor=2.0).dtype == torch.float32
        assert torch.softmax(x.bfloat16(), -1).dtype == torch.float32
        assert F.linear(x, torch.randn(8, 8)).dtype == torch.bfloat16
    q = torch.empty(2, 4, 16, 8, device="meta")
    assert _FusedAttention(autocast)(q, q.bfloat16(), q.bfloat16()).dtype == torch.bfloat16
    assert _FusedAttention()(q, q, q).dtype == torch.float32
