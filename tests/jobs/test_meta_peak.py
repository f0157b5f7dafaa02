"""The most bytes a computation holds at once, measured on the meta device (jobs/meta_peak.py), against counts made
by hand."""
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
