"""Rows per chunk of the evaluation passes (calib/chunks.py): from the block's per-row input bytes and the budget."""
import torch

from vq4dit.calib.capture import CalibrationSet
from vq4dit.calib.chunks import EVAL_BUDGET, FORWARD_FACTOR, chain_chunk, replay_chunk, rows_per_chunk
from vq4dit.calib.record import BlockCall
from vq4dit.calib.replay import Replay


def test_rows_per_chunk_fills_the_budget_within_one_and_most():
    """Catches a chunk of 0 rows for a row over the budget (the pass would never end) and a chunk past `most`
    (the passes' former size, which keeps the small models' artifacts as they were)."""
    assert rows_per_chunk(10, budget=100, most=256) == 10
    assert rows_per_chunk(10, budget=109, most=256) == 10
    assert rows_per_chunk(1000, budget=100, most=256) == 1
    assert rows_per_chunk(1, budget=10**9, most=256) == 256
    assert rows_per_chunk(0, budget=100, most=5) == 5


def replay_of(shapes, batched, dtype=torch.float16):
    """A Replay of one block call reading slots of `shapes` {key: shape} (meta tensors), `batched` {key: bool}."""
    table = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in shapes.items()}
    args = {"list": [{"slot": k} for k in shapes]}
    call = BlockCall("b0", {"dict": {"args": args, "kwargs": {"dict": {}}}}, {"t": 0})
    return Replay(call, table, batched, next(iter(shapes.values()))[0])


def test_dit_xl_keeps_256_rows_and_flux_dev_gets_a_handful():
    """DiT-XL/2 at 256 px (256 tokens x 1152) keeps the former 256 rows; Flux-dev (4096 + 512 tokens x 3072, its
    rotary table a constant) gets 7: fp32 inputs x 16 under 6 GiB. Catches the cache dtype's bytes counted (the
    passes feed fp32: bf16 gives 14 rows) and the old fixed 256."""
    dit = replay_of({"x": (1536, 256, 1152), "c": (1536, 1152)}, {"x": True, "c": True})
    assert replay_chunk(dit) == 256
    flux = replay_of({"img": (448, 4096, 3072), "txt": (448, 512, 3072), "temb": (448, 3072), "rope": (4608, 128)},
                     {"img": True, "txt": True, "temb": True, "rope": False}, dtype=torch.bfloat16)
    row = (4096 + 512 + 1) * 3072 * 4
    assert replay_chunk(flux) == EVAL_BUDGET // (FORWARD_FACTOR * row) == 7


def test_chain_passes_count_every_blocks_outputs_of_each_chain():
    """A chain pass keeps every block's outputs until the chain ends, for the student and the teacher at once:
    more blocks or two chains give fewer rows. Catches the chain counted as one block."""
    shapes = {"x": (4096, 256, 1152)}
    cset = CalibrationSet([None] * 28, {"x": torch.empty(shapes["x"], device="meta")}, {"x": True}, 4096)
    row = 256 * 1152 * 4
    assert chain_chunk(cset, copies=2) == EVAL_BUDGET // ((FORWARD_FACTOR + 56) * row)
    assert chain_chunk(cset, copies=1) == EVAL_BUDGET // ((FORWARD_FACTOR + 28) * row)
