"""Bit packing against a slow pure-Python bit-string reference."""
import pytest
import torch

from vq4dit.vq.packing import index_bits, index_dtype, pack_bits, packed_nbytes, unpack_bits


def reference_pack(values, bits):
    stream = "".join(format(v, f"0{bits}b")[::-1] for v in values)  # value bits LSB first
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 257])
def test_round_trip_matches_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 1 << bits, (n,), generator=g)
    if n:
        values[0] = (1 << bits) - 1  # the largest value must survive
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and len(packed) == packed_nbytes(n, bits)
    assert packed.tolist() == reference_pack(values.tolist(), bits)
    unpacked = unpack_bits(packed, bits, n)
    assert unpacked.dtype == index_dtype(1 << bits)  # the in-memory dtype of indices, never int64
    assert unpacked.tolist() == values.tolist()


def test_chunk_boundaries(monkeypatch):
    import vq4dit.vq.packing as packing

    monkeypatch.setattr(packing, "CHUNK", 16)  # several chunks with a ragged last one
    values = torch.randint(0, 1 << 5, (53,), generator=torch.Generator().manual_seed(0))
    packed = packing.pack_bits(values, 5)
    assert packed.tolist() == reference_pack(values.tolist(), 5)
    assert packing.unpack_bits(packed, 5, 53).tolist() == values.tolist()


def test_8_bit_values_are_the_packed_bytes():
    """No copy at all: an artifact's uint8 indices become the layer's buffer as they were read."""
    packed = pack_bits(torch.arange(256), 8)
    assert unpack_bits(packed, 8, 256) is packed


@pytest.mark.parametrize("values,bits", [([4], 2), ([-1], 3), ([1 << 16], 16)])
def test_out_of_range_values_rejected(values, bits):
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor(values), bits)


def test_wrong_length_rejected():
    with pytest.raises(ValueError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("k,bits", [(2, 1), (3, 2), (64, 6), (256, 8), (257, 9), (65536, 16)])
def test_index_bits(k, bits):
    assert index_bits(k) == bits


@pytest.mark.parametrize("k,dtype", [(2, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                     (32768, torch.int16), (32769, torch.int32), (65536, torch.int32)])
def test_index_dtype_holds_every_index(k, dtype):
    assert index_dtype(k) == dtype
    assert torch.tensor(k - 1).to(dtype).item() == k - 1
