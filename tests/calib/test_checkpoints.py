"""CheckpointStore: an output directory's calibration checkpoints (save, load), the run key a resume must match,
and the calibration log."""
import json
import os

import pytest
import torch

from vq4dit.calib.checkpoints import LOG_NAME, STATE_DIR, CalibLog, Checkpoint, CheckpointStore, discard_state
from vq4dit.jobs.runkey import Input, RunKey
from vq4dit.utils.errors import UserError

KEY = RunKey({"iters": 2}, (Input("checkpoint", "/ckpt.pt", "aaaa"),))


def save_first(tmp_path, acts):
    """What the record stage saves first: the wiring and the recorded tables, no layer yet."""
    CheckpointStore(str(tmp_path), KEY).save(Checkpoint(acts=acts, wiring={}))


def test_stale_temporaries_are_pruned(tmp_path):
    directory = tmp_path / STATE_DIR
    directory.mkdir()
    (directory / ".layers-00001.safetensors.abc.tmp").write_bytes(b"half a file")
    save_first(tmp_path, {"x": torch.zeros(3)})
    assert sorted(os.listdir(directory)) == ["acts-00000.safetensors", "layers-00000.safetensors", "state.json"]


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_damaged_state_is_refused_on_open_and_overwrite_starts_over(tmp_path, damage):
    """A state file replaced by garbage or deleted: refused when the store opens, naming the file, the directory and
    --overwrite, and deleted by --overwrite, which starts over (a new user's trial: the damage surfaced only at the
    resume, as "delete it to start over", and --overwrite could not clear it; mutation: the files checked only on
    load)."""
    save_first(tmp_path, {"x": torch.zeros(3)})
    path = tmp_path / STATE_DIR / "acts-00000.safetensors"
    path.write_bytes(b"garbage, not safetensors") if damage == "garbage" else path.unlink()
    said = "is missing" if damage == "missing" else "is not the file this run saved"
    with pytest.raises(UserError, match=rf"calib_state: acts-00000.safetensors {said}.*pass --overwrite to start"):
        CheckpointStore(str(tmp_path), KEY)
    fresh = CheckpointStore(str(tmp_path), KEY, overwrite=True)
    assert fresh.load() is None and not (tmp_path / STATE_DIR).exists()


def test_state_of_another_config_is_refused_on_open_naming_the_field(tmp_path):
    save_first(tmp_path, {})
    with pytest.raises(UserError, match=r"config changed .*\(iters 2 -> 3\); rerun with a new --out, delete .*"
                                        r"calib_state, or pass --overwrite"):
        CheckpointStore(str(tmp_path), RunKey({"iters": 3}, KEY.inputs))
    assert CheckpointStore(str(tmp_path), KEY).meta is not None  # refused, not deleted


def test_input_whose_content_changed_at_the_same_path_is_refused(tmp_path):
    """The config (path included) is the same, the checkpoint's digest is not: a resume would mix two models
    (mutation: comparing the config alone)."""
    save_first(tmp_path, {})
    replaced = RunKey(KEY.config, (Input("checkpoint", "/ckpt.pt", "bbbb"),))
    with pytest.raises(UserError, match=r"checkpoint /ckpt.pt changed since the saved calibration state "
                                        r"\(digest aaaa != bbbb\)"):
        CheckpointStore(str(tmp_path), replaced)


def test_overwrite_deletes_a_state_this_run_would_not_resume_and_starts_fresh(tmp_path):
    save_first(tmp_path, {"x": torch.zeros(3)})
    other = RunKey({"iters": 3}, KEY.inputs)
    fresh = CheckpointStore(str(tmp_path), other, overwrite=True)
    assert fresh.load() is None and not (tmp_path / STATE_DIR).exists()
    fresh.save(Checkpoint(acts={}, wiring={}))
    assert CheckpointStore(str(tmp_path), other).meta["run"] == other.to_json()  # its own key, read back equal


def test_a_state_of_an_older_format_is_refused_not_resumed(tmp_path):
    save_first(tmp_path, {})
    path = tmp_path / STATE_DIR / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 2}))
    with pytest.raises(UserError, match="format 2, expected 3.*--overwrite"):
        CheckpointStore(str(tmp_path), KEY)


@pytest.mark.parametrize("kind", ["acts", "layers"])
def test_a_state_file_changed_on_disk_is_refused_not_resumed(tmp_path, kind):
    """One byte of a saved tensor flipped (a bad disk, a copy gone wrong): the header still parses, and the resume
    gave another artifact without a word. Each file's sha256 is in state.json and checked on resume, also for the
    recorded tables a later save keeps (mutation: no check -> the flipped value loads)."""
    store = CheckpointStore(str(tmp_path), KEY)
    store.save(Checkpoint(acts={"fp/s0.0": torch.ones(64)}, wiring={}))
    store.save(Checkpoint(1, [{"block": 0}], {"blocks.0.fc.weight": torch.ones(64)}, None))  # keeps the tables
    path = tmp_path / STATE_DIR / f"{kind}-0000{0 if kind == 'acts' else 1}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last tensor's last byte
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"calib_state: {path.name} is not the file this run saved"):
        CheckpointStore(str(tmp_path), KEY).load()


def test_block_checkpoints_load_back_what_was_saved_last(tmp_path):
    """What a rerun loads is what the last save wrote: next block, stats, layers, tables, wiring (kept when a save
    gives none), and the resume point in words (mutations: acts None not keeping the previous file; the wiring
    dropped)."""
    layer = torch.nn.Linear(2, 2)
    store = CheckpointStore(str(tmp_path), KEY)
    store.save(Checkpoint(acts={"fp/s0.0": torch.ones(2)}, wiring={"calls": []}))
    store.save(Checkpoint(1, [{"block": 0}], layers_of(layer), {"fp/s0.0": torch.full((2,), 2.0)}))
    assert torch.equal(CheckpointStore(str(tmp_path), KEY).load().acts["fp/s0.0"], torch.full((2,), 2.0))
    store.save(Checkpoint(2, [{"block": 0}, {"block": 1}], layers_of(layer), None))
    again = CheckpointStore(str(tmp_path), KEY).load()
    assert (again.next_block, again.stats, again.resume_point) == (2, [{"block": 0}, {"block": 1}], "block 2")
    assert torch.equal(again.layers["blocks.0.fc.weight"], layer.weight.detach())
    assert torch.equal(again.acts["fp/s0.0"], torch.full((2,), 2.0)) and again.wiring == {"calls": []}
    store.remove()
    assert not (tmp_path / STATE_DIR).exists() and CheckpointStore(str(tmp_path), KEY).load() is None


def test_a_training_snapshot_round_trips_with_its_optimizer(tmp_path):
    """A joint or online checkpoint mid-training: the Trainer snapshot comes back with the optimizer's tensors."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.RMSprop([p], lr=0.1)
    p.grad = torch.ones(3)
    optimizer.step()
    store = CheckpointStore(str(tmp_path), KEY)
    store.save(Checkpoint(acts={}, wiring={}))
    store.save(Checkpoint(train={"iteration": 7, "trajectory": 2, "optimizer": optimizer.state_dict()}))
    back = CheckpointStore(str(tmp_path), KEY).load()
    assert back.resume_point == "online trajectory 2" and back.train["iteration"] == 7
    assert torch.equal(back.train["optimizer"]["state"][0]["square_avg"], optimizer.state[p]["square_avg"])


def test_the_log_appends_each_record_once_and_replaces_the_old_one_only_when_published(tmp_path):
    """The lines go to the calibration state until `publish`; the log beside the artifact before then is the
    earlier run's, untouched (mutation: the log written beside the artifact as it grows -> the earlier log is gone at
    once)."""
    (tmp_path / LOG_NAME).write_text("the earlier run's\n")
    log = CalibLog(str(tmp_path))
    log.clear()
    log.append("blockwise", [{"block": 0}])
    log.append("e2e", [{"stage": "e2e"}])
    assert (tmp_path / LOG_NAME).read_text() == "the earlier run's\n"
    log.publish()
    lines = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert lines == [{"mode": "blockwise", "block": 0}, {"mode": "e2e", "stage": "e2e"}]
    assert not (tmp_path / STATE_DIR / LOG_NAME).exists()


def test_a_state_saved_before_the_log_moved_into_it_keeps_its_lines(tmp_path):
    """A calibration state saved by an earlier version kept its log beside the artifact; resuming it appends to the
    working log, which then starts from those lines (mutation: an empty working log -> the first blocks' lines lost
    when it is published)."""
    (tmp_path / LOG_NAME).write_text('{"mode": "blockwise", "block": 0}\n')
    log = CalibLog(str(tmp_path))
    os.makedirs(tmp_path / STATE_DIR)
    log.append("blockwise", [{"block": 1}])
    log.publish()
    assert [json.loads(line)["block"] for line in (tmp_path / LOG_NAME).read_text().splitlines()] == [0, 1]


def layers_of(layer):
    return {f"blocks.0.fc.{k}": t.detach().clone() for k, t in layer.state_dict().items()}


def test_only_a_saved_state_is_another_runs(tmp_path):
    """Temporaries of a run killed before its first save are nothing to resume: no refusal (mutation: testing for the
    directory rather than its state.json); a saved one is refused, then deleted with overwrite."""
    directory = tmp_path / STATE_DIR
    directory.mkdir()
    (directory / ".layers-00000.safetensors.abc.tmp").write_bytes(b"half a file")
    discard_state(str(tmp_path), False, "why")
    save_first(tmp_path, {})
    with pytest.raises(UserError, match="calib_state: why; rerun with a new --out"):
        discard_state(str(tmp_path), False, "why")
    discard_state(str(tmp_path), True, "why")
    assert not directory.exists()


def test_a_fresh_walk_does_not_read_back_what_it_saved(tmp_path, monkeypatch):
    """A fresh block-wise run saves its recorded tables first, then walks: nothing it saved is read back from disk
    (for DiT-XL/2 the tables are GiBs, and a read-back copy stayed in memory beside the live ones). Catches save()
    not keeping what it wrote for load()."""
    import vq4dit.calib.checkpoints
    from tests.calib.conftest import quantized_pair, run_calibration, tiny_config
    from vq4dit.models.adapters import adapter_for

    read, load_file = [], vq4dit.calib.checkpoints.load_file
    monkeypatch.setattr(vq4dit.calib.checkpoints, "load_file", lambda path: read.append(path) or load_file(path))
    config = tiny_config(iters=2)
    student, teacher, qlayers = quantized_pair(config)
    stats = run_calibration(student, teacher, adapter_for(student), qlayers, config, str(tmp_path))
    assert len(stats) == 2 and read == []


def test_a_joint_runs_resume_point_says_what_is_kept_and_what_is_redone():
    """Ctrl-C in --calib joint said "resume from block 0": the recording is kept, but joint progress since its last
    save (at most every 10 minutes) is made again, which the text did not say (mutation: the block-wise words)."""
    from vq4dit.calib.checkpoints import describe_point

    joint = {"run": {"config": {"calib": "joint"}}, "next_block": 0}
    assert describe_point(joint) == "the recorded calibration set (joint training starts over)"
    assert describe_point({**joint, "train_state": {"iteration": 40}}).startswith(
        "joint iteration 40 (saved at most every 10 minutes: the updates since are made again)")
    assert describe_point({"run": {"config": {"calib": "blockwise"}}, "next_block": 3}) == "block 3"
