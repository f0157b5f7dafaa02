"""CalibState: the one owner of an output directory's calibration state, digest, log and resume."""
import json
import os

import pytest
import torch

from calib.state import LOG_NAME, STATE_DIR, CalibState, Input, RunKey, discard_state
from utils.errors import UserError

KEY = RunKey({"iters": 2}, (Input("checkpoint", "/ckpt.pt", "aaaa"),))


def test_stale_temporaries_are_pruned(tmp_path):
    directory = tmp_path / STATE_DIR
    directory.mkdir()
    (directory / ".layers-00001.safetensors.abc.tmp").write_bytes(b"half a file")
    CalibState(str(tmp_path), KEY).start({}, {"x": torch.zeros(3)})
    assert sorted(os.listdir(directory)) == ["acts-00000.safetensors", "layers-00000.safetensors", "state.json"]


def test_unreadable_state_is_a_user_error(tmp_path):
    CalibState(str(tmp_path), KEY).start({}, {"x": torch.zeros(3)})
    (tmp_path / STATE_DIR / "acts-00000.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(UserError, match="cannot resume from .*delete it to start over"):
        CalibState(str(tmp_path), KEY).saved


def test_state_of_another_config_is_refused_on_open_naming_the_field(tmp_path):
    CalibState(str(tmp_path), KEY).start({}, {})
    with pytest.raises(UserError, match=r"config changed .*\(iters 2 -> 3\); rerun with a new --out, delete .*"
                                        r"calib_state, or pass --overwrite"):
        CalibState(str(tmp_path), RunKey({"iters": 3}, KEY.inputs))
    assert CalibState(str(tmp_path), KEY).meta is not None  # refused, not deleted


def test_input_whose_content_changed_at_the_same_path_is_refused(tmp_path):
    """The config (path included) is the same, the checkpoint's digest is not: a resume would mix two models
    (mutation: comparing the config alone)."""
    CalibState(str(tmp_path), KEY).start({}, {})
    replaced = RunKey(KEY.config, (Input("checkpoint", "/ckpt.pt", "bbbb"),))
    with pytest.raises(UserError, match=r"checkpoint /ckpt.pt changed since the saved calibration state "
                                        r"\(digest aaaa != bbbb\)"):
        CalibState(str(tmp_path), replaced)


def test_overwrite_deletes_a_state_this_run_would_not_resume_and_starts_fresh(tmp_path):
    CalibState(str(tmp_path), KEY).start({}, {"x": torch.zeros(3)})
    other = RunKey({"iters": 3}, KEY.inputs)
    fresh = CalibState(str(tmp_path), other, overwrite=True)
    assert fresh.meta is None and not (tmp_path / STATE_DIR).exists()
    fresh.start({}, {})
    assert CalibState(str(tmp_path), other).meta["run"] == other.to_json()  # its own key, read back equal


def test_a_state_of_an_older_format_is_refused_not_resumed(tmp_path):
    CalibState(str(tmp_path), KEY).start({}, {})
    path = tmp_path / STATE_DIR / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    with pytest.raises(UserError, match="format 2, expected 3.*--overwrite"):
        CalibState(str(tmp_path), KEY)


def test_block_states_resume_where_they_stopped_and_log_each_block_once(tmp_path):
    """What a rerun reads back is what the last writer saved: next block, stats, layers, tables; each block's stats
    are logged once (mutation: block_done not logging, or logging every block again)."""
    layer = torch.nn.Linear(2, 2)
    state = CalibState(str(tmp_path), KEY)
    state.start({"calls": []}, {"fp/s0.0": torch.ones(2)})
    state.block_done([{"block": 0}], {"blocks.0.fc": layer}, {"fp/s0.0": torch.full((2,), 2.0)})
    state.block_done([{"block": 0}, {"block": 1}], {"blocks.0.fc": layer}, {})
    again = CalibState(str(tmp_path), KEY)
    assert (again.next_block, again.stats, again.resume_point()) == (2, [{"block": 0}, {"block": 1}], "block 2")
    assert torch.equal(again.saved.layers["blocks.0.fc.weight"], layer.weight.detach())
    assert again.saved.acts == {} and again.meta["wiring"] == {"calls": []}
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log == [{"mode": "blockwise", "block": 0}, {"mode": "blockwise", "block": 1}]
    again.remove()
    assert not (tmp_path / STATE_DIR).exists() and CalibState(str(tmp_path), KEY).meta is None


def test_only_a_saved_state_is_another_runs(tmp_path):
    """Temporaries of a run killed before its first save are nothing to resume: no refusal (mutation: testing for the
    directory rather than its state.json); a saved one is refused, then deleted with overwrite."""
    directory = tmp_path / STATE_DIR
    directory.mkdir()
    (directory / ".layers-00000.safetensors.abc.tmp").write_bytes(b"half a file")
    discard_state(str(tmp_path), False, "why")
    CalibState(str(tmp_path), KEY).start({}, {})
    with pytest.raises(UserError, match="calib_state: why; rerun with a new --out"):
        discard_state(str(tmp_path), False, "why")
    discard_state(str(tmp_path), True, "why")
    assert not directory.exists()
