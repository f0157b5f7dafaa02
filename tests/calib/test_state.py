"""CalibState: the one owner of an output directory's calibration state, digest, log and resume."""
import json
import os

import pytest
import torch

from calib.state import LOG_NAME, STATE_DIR, CalibState
from utils.errors import UserError


def test_stale_temporaries_are_pruned(tmp_path):
    directory = tmp_path / STATE_DIR
    directory.mkdir()
    (directory / ".layers-00001.safetensors.abc.tmp").write_bytes(b"half a file")
    CalibState(str(tmp_path), "digest").start({}, {"x": torch.zeros(3)})
    assert sorted(os.listdir(directory)) == ["acts-00000.safetensors", "layers-00000.safetensors", "state.json"]


def test_unreadable_state_is_a_user_error(tmp_path):
    CalibState(str(tmp_path), "digest").start({}, {"x": torch.zeros(3)})
    (tmp_path / STATE_DIR / "acts-00000.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(UserError, match="cannot resume from .*delete it to start over"):
        CalibState(str(tmp_path), "digest").saved


def test_state_of_another_config_is_refused_on_open(tmp_path):
    CalibState(str(tmp_path), "digest").start({}, {})
    with pytest.raises(UserError, match="different config.*fresh --out or delete"):
        CalibState(str(tmp_path), "another")


def test_block_states_resume_where_they_stopped_and_log_each_block_once(tmp_path):
    """What a rerun reads back is what the last writer saved: next block, stats, layers, tables; each block's stats
    are logged once (mutation: block_done not logging, or logging every block again)."""
    layer = torch.nn.Linear(2, 2)
    state = CalibState(str(tmp_path), "digest")
    state.start({"calls": []}, {"fp/s0.0": torch.ones(2)})
    state.block_done([{"block": 0}], {"blocks.0.fc": layer}, {"fp/s0.0": torch.full((2,), 2.0)})
    state.block_done([{"block": 0}, {"block": 1}], {"blocks.0.fc": layer}, {})
    again = CalibState(str(tmp_path), "digest")
    assert (again.next_block, again.stats, again.resume_point()) == (2, [{"block": 0}, {"block": 1}], "block 2")
    assert torch.equal(again.saved.layers["blocks.0.fc.weight"], layer.weight.detach())
    assert again.saved.acts == {} and again.meta["wiring"] == {"calls": []}
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log == [{"mode": "blockwise", "block": 0}, {"mode": "blockwise", "block": 1}]
    again.remove()
    assert not (tmp_path / STATE_DIR).exists() and CalibState(str(tmp_path), "digest").meta is None
