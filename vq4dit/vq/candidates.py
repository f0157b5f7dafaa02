"""Candidate assignment sets and soft / hard reconstruction of sub-vectors (pure functions of tensors)."""
import torch

from vq4dit.utils.errors import UserError
from vq4dit.vq.nearest import DEFAULT_CHUNK, nearest_n

RATIO_INITS = ("inverse_distance", "uniform")
# candidates_around: the kept codeword's start ratio over the nearest other's (measured on the digits model, W2,
# output-aware start: 9 gave 34.3 dB PSNR vs FP, an even start (1) 32.8 dB; 3 and 30 matched 9 on a tiny DiT)
KEEP_ADVANTAGE = 9.0
INVERSE_DISTANCE_EPS = 1e-8  # keeps log(1/dist) finite when a sub-vector sits exactly on a codeword


def nearest_codewords(x, codebook, n, chunk_size=DEFAULT_CHUNK):
    """The n nearest codewords of every sub-vector, closest first.

    x (N, d), codebook (k, d) -> (index (N, n) int64, distance (N, n) Euclidean, x.dtype).
    """
    k = codebook.shape[0]
    if not 1 <= n <= k:
        raise UserError(f"invalid candidates={n}: must be in 1..codebook_size ({k})")
    index, sqdist = nearest_n(x, codebook, n, chunk_size)
    return index, sqdist.sqrt_()


def candidates_around(x, codebook, chosen, n, chunk_size=DEFAULT_CHUNK):
    """Candidate sets that keep a given assignment: `chosen` (N,) first, then the nearest other codewords.

    x (N, d), codebook (k, d), chosen (N,) int -> (index (N, n) int64, distance (N, n)). The chosen codeword's
    distance is set to KEEP_ADVANTAGE times below the nearest other's, so inverse-distance ratios start at 0.9 on it
    (n = 2) and the argmax is it: the soft layer starts close to, and a layer hardened at once keeps, an assignment
    that is not the nearest codeword (e.g. the output-aware one, whose errors compensate across columns: an even
    mix with the nearest codeword undoes that and calibration may end above its start).
    """
    near, dist = nearest_codewords(x, codebook, n, chunk_size)  # (N, n)
    chosen = chosen.long().to(near.device)
    order = torch.argsort((near == chosen[:, None]).int(), dim=1, stable=True)[:, :n - 1]  # others, nearest first
    others, d_others = near.gather(1, order), dist.gather(1, order)  # (N, n - 1)
    if n > 1:
        d_chosen = d_others.min(1).values / KEEP_ADVANTAGE  # (N,)
    else:  # no other candidate to be ahead of: its own distance
        d_chosen = (x.float() - codebook.float()[chosen]).norm(dim=1).to(dist.dtype)  # (N,)
    return torch.cat([chosen[:, None], others], 1), torch.cat([d_chosen[:, None], d_others], 1)


def init_logits(dist, mode="inverse_distance"):
    """Ratio logits (N, n) from candidate distances (N, n).

    inverse_distance: softmax(logits) proportional to 1/distance (the authors' code); uniform: r = 1/n (the paper).
    """
    if mode == "inverse_distance":
        return -torch.log(dist.float() + INVERSE_DISTANCE_EPS)
    if mode == "uniform":
        return torch.zeros_like(dist, dtype=torch.float32)
    raise UserError(f"invalid ratio_init={mode!r}: choose one of {', '.join(RATIO_INITS)}")


def masked_ratios(logits, frozen):
    """softmax(logits) (N, n), with frozen rows replaced by the one-hot of their argmax (no gradient there).

    Selected on the device whether any row is frozen or not: asking would make the host wait for the device at
    every forward of a calibration update. With no row frozen the values and gradients are softmax's, bit for bit.
    """
    soft = torch.softmax(logits, dim=1)
    choices = torch.arange(logits.shape[1], device=logits.device)  # (n,)
    hard = (logits.argmax(1, keepdim=True) == choices).to(soft.dtype)  # (N, n) one-hot of the argmax
    return torch.where(frozen[:, None], hard, soft)


def _lookup(codebook, indices):
    """codebook (G, k, d), indices (G, M) any integer dtype, into each group's own codebook -> (G, M, d).

    One index_select on the flattened codebook: its backward (index_add) sums each codeword's gradient in a
    fixed order, so calibration on CPU is bitwise reproducible with any thread count (advanced indexing's
    backward, a multi-threaded index_put with accumulate, is not).
    """
    g, k, d = codebook.shape
    flat = indices.long() + k * torch.arange(g, device=codebook.device)[:, None]  # (G, M) rows of (G*k, d)
    return codebook.reshape(g * k, d).index_select(0, flat.reshape(-1)).view(g, -1, d)


def soft_reconstruct(codebook, candidates, ratios):
    """sum_j r_j * C_g[cand_j]: codebook (G, k, d), candidates (N, n) any integer dtype, ratios (N, n) -> (N, d).

    Sub-vector i belongs to group i // (N / G) (groups are consecutive blocks of output rows).
    """
    g, _, d = codebook.shape
    n = candidates.shape[1]
    vecs = _lookup(codebook, candidates.reshape(g, -1)).view(g, -1, n, d)  # (G, N/G, n, d)
    return torch.einsum("gmj,gmjd->gmd", ratios.view(g, -1, n), vecs).reshape(-1, d)


def hard_reconstruct(codebook, indices):
    """C_g[indices]: codebook (G, k, d), indices (N,) any integer dtype -> sub-vectors (N, d)."""
    return _lookup(codebook, indices.view(codebook.shape[0], -1)).reshape(-1, codebook.shape[2])
