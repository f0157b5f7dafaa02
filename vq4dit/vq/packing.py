"""Bit-packing of codeword indices: N values of `bits` bits each -> ceil(N * bits / 8) bytes.

Layout: the value stream is little-endian at the bit level: bit b of value i is stream bit i * bits + b, and
stream bit s is bit (s % 8) of byte s // 8. 8-bit values are stored as plain uint8.
"""
import math

import torch

MAX_BITS = 16
CHUNK = 1 << 18  # values per step (a multiple of 8, so every chunk starts on a byte boundary); int64 temporaries
# of a chunk take at most 8 * 16 bytes per value, 32 MiB


def index_bits(k):
    """Bits needed to store an index into a codebook of k entries (k >= 2)."""
    if k < 2:
        raise ValueError(f"codebook size must be at least 2, got {k}")
    return math.ceil(math.log2(k))


def packed_nbytes(n, bits):
    return (n * bits + 7) // 8


def _check_bits(bits):
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def index_dtype(levels):
    """The smallest integer dtype holding 0..levels-1: how indices are kept in memory (an int64 index per
    DiT-XL/2 sub-vector would take 1.35 GB at W2; uint8 takes 169 MB). Cast with .long() where they index."""
    if levels <= 1 << 8:
        return torch.uint8
    if levels <= 1 << 15:
        return torch.int16
    return torch.int32


def pack_bits(values, bits):
    """values (N,) integer in [0, 2**bits) -> (ceil(N * bits / 8),) uint8."""
    _check_bits(bits)
    values = values.reshape(-1).long()
    if len(values) and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"got range [{values.min().item()}, {values.max().item()}]")
    if bits == 8:
        return values.to(torch.uint8)
    shifts = torch.arange(bits, device=values.device)  # (bits,)
    byte_weights = 1 << torch.arange(8, device=values.device)  # (8,)
    out = []
    for s in range(0, len(values), CHUNK):
        v = values[s:s + CHUNK]
        stream = ((v[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # (c * bits,) bits, LSB first
        pad = (-len(stream)) % 8  # only the last chunk can be ragged
        stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)  # (bytes, 8)
        out.append((stream.long() * byte_weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=values.device)


def unpack_bits(packed, bits, n):
    """Inverse of pack_bits: packed (ceil(n * bits / 8),) uint8 -> (n,) values in index_dtype(2**bits).

    The values go straight into their in-memory dtype (uint8 up to 8 bits): no int64 copy of a whole layer is
    made, only per-chunk int64 temporaries. 8-bit values are the packed bytes themselves (no copy).
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) != packed_nbytes(n, bits):
        raise ValueError(f"expected {packed_nbytes(n, bits)} uint8 bytes for {n} values of {bits} bits, "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    if bits == 8:
        return packed
    out = torch.empty(n, dtype=index_dtype(1 << bits), device=packed.device)
    shifts8 = torch.arange(8, device=packed.device)  # (8,)
    value_weights = 1 << torch.arange(bits, device=packed.device)  # (bits,)
    bytes_per_chunk = CHUNK * bits // 8
    for s in range(0, len(packed), bytes_per_chunk):
        stream = (packed[s:s + bytes_per_chunk, None].long() >> shifts8) & 1  # (c, 8) bits, LSB first
        first = (s * 8) // bits  # index of the first value held in this chunk
        m = min(CHUNK, n - first)
        out[first:first + m] = (stream.reshape(-1)[:m * bits].reshape(m, bits) * value_weights).sum(1)
    return out
