"""How the memory plan composes a block's measured update (jobs.plan_probes.block_training_bytes: the update's
bytes, and under torchrun a process's share of the minibatch's inputs and targets) into the walk's and the
end-to-end pass's stages. The measurement itself: test_memory_plan_vs_runs.py."""
from unittest import mock

import vq4dit.jobs.memory_plan as memory_plan_module
from vq4dit.jobs.config import load_config
from vq4dit.jobs.memory_plan import plan_for


def test_a_block_without_quantized_layers_trains_nothing_and_the_end_pass_holds_one_share():
    """The embedded model with blocks 0 and 3 quantized, each block's update measured as 1000 bytes and its share as
    300: the walk's blocks 0 and 3 hold 1300 and the others nothing (calib.blockwise skips them); the end-to-end
    pass holds every block's update (it backpropagates through all six) and one share (the chain's inputs and
    targets). Catches the skipped blocks planned as training, and the pass counting every block's share."""
    config = load_config(overrides={"include": r"^blocks\.[03]\.", "e2e_iters": 10})
    with mock.patch.object(memory_plan_module, "block_training_bytes", lambda *args: (1000, 300)):
        inputs = plan_for(config).inputs
    assert inputs.train == [1300, 0, 0, 1300, 0, 0]
    assert inputs.end_pass == 6 * 1000 + 300
