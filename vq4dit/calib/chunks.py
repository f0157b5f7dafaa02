"""How many calibration points an evaluation pass sends through a block at once: as many as a byte budget holds.

An evaluation pass (a forward without gradients: the FP targets, the errors, the guard's probe, the input moments,
the chain's errors) runs over every point in chunks. A chunk's device memory is its rows times the per-row
footprint: the block's inputs in fp32 (tokens x width x 4 bytes per tensor) times FORWARD_FACTOR, what the block
computes inside from them. FORWARD_FACTOR is measured by the memory plan on the meta device (a fused attention
kernel, as CUDA runs it): the tensors a forward holds at its peak, over its fp32 inputs, are 11.5 for a DiT-XL/2
block at 256 px, 10.9 for a Flux-dev double block, 14.0 for a Flux-dev single block and 14.5 for the embedded
model's; plus the inputs themselves, 16 covers them all.

EVAL_BUDGET is a constant, not a setting: the chunk decides the order of floating-point sums, so a budget that
followed the machine (its free memory) would make the artifact depend on the machine. 6 GiB keeps today's 256 rows
for DiT-XL/2 at 256 px (4.5 GiB) and the embedded model, and gives Flux-dev (4,608 tokens x 3,072) 7 rows, about
5.5 GiB, where 256 rows needed 150-190 GiB. Each pass keeps its own most rows (`most`), the chunk it took before.
"""
from vq4dit.calib.calls import leaves
from vq4dit.calib.tables import ref_of

FORWARD_FACTOR = 16
EVAL_BUDGET = 6 * 2**30  # bytes
MOST_ROWS = 256  # the chunk every pass but the end-to-end pass's error took before budgets


def rows_per_chunk(row_bytes, budget=EVAL_BUDGET, most=MOST_ROWS):
    """Rows per chunk for a pass needing `row_bytes` of device memory per row: as many as `budget` holds, at least
    1 (a row over the budget still runs, one at a time) and at most `most`."""
    return max(1, min(most, budget // max(1, row_bytes)))


def input_row_bytes(table, batched, refs):
    """Bytes per row of the floating tensors `refs` (table references) read from `table`, in fp32 as passes feed
    them to a block; constant slots (not `batched`) count once, not per row."""
    total = 0
    for ref in refs:
        t = table[ref]
        if t.is_floating_point() and batched.get(ref, True) and t.dim() > 0 and t.shape[0] > 0:
            total += t[0].numel() * 4
    return total


def block_row_bytes(input_bytes):
    """Device bytes per row of one block's forward on inputs of `input_bytes` per row."""
    return FORWARD_FACTOR * input_bytes


def chain_row_bytes(input_bytes, blocks, copies):
    """Device bytes per row of a chain pass (calib.replay.run_chain): every one of `blocks` keeps its outputs
    (about its inputs' size: the chain's hidden states) until the chain ends, for `copies` chains at once (a
    student and its teacher: 2), plus one block's forward."""
    return (FORWARD_FACTOR + copies * blocks) * input_bytes


def replay_chunk(replay, budget=EVAL_BUDGET, most=MOST_ROWS):
    """Rows per chunk of a one-block pass over calib.replay.Replay `replay`."""
    refs = [ref_of(node) for node in leaves(replay.call.inputs)]
    return rows_per_chunk(block_row_bytes(input_row_bytes(replay.table, replay.batched, refs)), budget, most)


def chain_chunk(cset, copies, budget=EVAL_BUDGET, most=MOST_ROWS):
    """Rows per chunk of a chain pass over the calibration set `cset` (calib.capture.CalibrationSet) with
    `copies` chains at once; the chain's per-row size is that of its recorded slots."""
    row = input_row_bytes(cset.slots, cset.batched, list(cset.slots))
    return rows_per_chunk(chain_row_bytes(row, len(cset.calls), copies), budget, most)

