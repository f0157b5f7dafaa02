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
    return codebook.reshape(g * k, d).index_select(0, indices_into_flat(codebook, indices)).view(g, -1, d)


def indices_into_flat(codebook, indices):
    """indices (G, M) any integer dtype into each group's own codebook (G, k, d) -> (G*M,) int64 rows of the
    flattened (G*k, d) codebook (int64: a CPU's index_add is several times slower with int32 indices)."""
    g, k, _ = codebook.shape
    return (indices.long() + k * torch.arange(g, device=codebook.device)[:, None]).reshape(-1)


CODEBOOK_GRADS = ("index_add", "sorted")


def sum_into_rows(values, rows, size, method="index_add"):
    """out[r] = sum of values[i] over i with rows[i] == r: values (M, d), rows (M,) int64 in [0, size) -> (size, d).

    "index_add": index_add_ into zeros (index_select's own backward; a CPU adds in a fixed order, a GPU by atomic
    adds, thousands of them to each of the few codewords). "sorted": no atomics, deterministic on a GPU too: the
    values in the order of their rows (a stable sort), float64 running sums, each row's sum the difference of the
    running sums at its ends (exact to float64 rounding of the running total, far below float32's resolution).
    """
    if method == "index_add":
        return values.new_zeros(size, values.shape[1]).index_add_(0, rows, values)
    order = torch.argsort(rows, stable=True)  # (M,)
    ends = torch.searchsorted(rows[order], torch.arange(size + 1, device=rows.device))  # (size + 1,)
    running = torch.cat([values.new_zeros(1, values.shape[1], dtype=torch.float64),
                         values.index_select(0, order).double().cumsum(0)])  # (M + 1, d)
    return (running[ends[1:]] - running[ends[:-1]]).to(values.dtype)


class _SoftWeight(torch.autograd.Function):
    """sum_j r_j * C[row_j] in one pass: flat codebook (R, d), rows (N*n,) int64, ratios (N, n) -> (N, d).

    Forward: one gather of the N*n candidate codewords and one elementwise weighted sum over j (einsum's form is a
    batched (1 x n) @ (n x d) product: N tiny matrix-vector products, slow kernels on a GPU). Backward: the gather
    again rather than its (N, n, d) result kept from the forward (n*d floats per sub-vector of every soft layer,
    held through the whole update); the ratios' gradient elementwise; the codebook's, each candidate's r_j * grad
    summed into its codeword by sum_into_rows(..., `method`).
    """

    @staticmethod
    def forward(ctx, flat, rows, ratios, method):
        n, d = ratios.shape[1], flat.shape[1]
        vecs = flat.index_select(0, rows).view(-1, n, d)  # (N, n, d)
        ctx.save_for_backward(flat, rows, ratios)
        ctx.method = method
        return (vecs * ratios[:, :, None]).sum(1)

    @staticmethod
    def backward(ctx, grad):  # grad (N, d)
        flat, rows, ratios = ctx.saved_tensors
        n, d = ratios.shape[1], flat.shape[1]
        grad_flat = grad_ratios = None
        if ctx.needs_input_grad[2]:
            vecs = flat.index_select(0, rows).view(-1, n, d)  # (N, n, d)
            grad_ratios = (vecs * grad[:, None, :]).sum(2)  # (N, n)
        if ctx.needs_input_grad[0]:
            per_candidate = ratios[:, :, None] * grad[:, None, :]  # (N, n, d)
            grad_flat = sum_into_rows(per_candidate.view(-1, d), rows, flat.shape[0], ctx.method)
        return grad_flat, None, grad_ratios, None


def soft_reconstruct(codebook, candidates, ratios, one_pass=None, codebook_grad="index_add"):
    """sum_j r_j * C_g[cand_j]: codebook (G, k, d), candidates (N, n) any integer dtype, ratios (N, n) -> (N, d).

    Sub-vector i belongs to group i // (N / G) (groups are consecutive blocks of output rows).
    one_pass: the one-pass form (_SoftWeight) or einsum's; None: one pass off the CPU. On a CPU einsum's form is
    the faster (its batched product beats the elementwise sum there) and keeps every artifact as it was, bit for
    bit; the two agree within float rounding (tests/vq/test_candidates.py). codebook_grad (one pass only): how the
    codebook's gradient is summed (sum_into_rows; benchmarks/gpu_check.py times both on a GPU).
    """
    g, k, d = codebook.shape
    n = candidates.shape[1]
    if one_pass or (one_pass is None and codebook.device.type != "cpu"):
        flat = indices_into_flat(codebook, candidates.reshape(g, -1))  # (N*n,)
        return _SoftWeight.apply(codebook.reshape(g * k, d), flat, ratios, codebook_grad)
    vecs = _lookup(codebook, candidates.reshape(g, -1)).view(g, -1, n, d)  # (G, N/G, n, d)
    return torch.einsum("gmj,gmjd->gmd", ratios.view(g, -1, n), vecs).reshape(-1, d)


def hard_reconstruct(codebook, indices):
    """C_g[indices]: codebook (G, k, d), indices (N,) any integer dtype -> sub-vectors (N, d)."""
    return _lookup(codebook, indices.view(codebook.shape[0], -1)).reshape(-1, codebook.shape[2])
