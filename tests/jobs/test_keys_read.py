"""jobs/keys_read.py: keys a method or calibration mode never reads are refused when given (flags or API keywords),
and the flags of a shared list each method reads."""
import pytest

from vq4dit.jobs.config import load_config
from vq4dit.jobs.keys_read import flags_read_by
from vq4dit.utils.errors import UserError


@pytest.mark.parametrize("overrides, flag", [
    ({"method": "rtn", "iters": 5}, "--iters"), ({"method": "rtn", "dim": 2}, "--dim"),
    ({"method": "kmeans", "candidates": 3}, "--candidates"), ({"method": "kmeans", "steps": 40}, "--steps"),
    ({"method": "kmeans", "codebook_init": "kmeans"}, "--codebook-init"),
    ({"method": "codebook", "lambda_r": 0.1}, "--lambda-r"), ({"online_batch": 8}, "--online-batch"),
    ({"calib": "joint", "student_label_dropout": 0.1}, "--student-label-dropout"),
    ({"calib": "online", "calib_timesteps": 4}, "--calib-timesteps"),
    ({"method": "kmeans", "bits": 1.5, "calib_samples": 3}, "--calib-samples"),
    ({"method": "kmeans", "bits": 1.5, "calib_timesteps": 2}, "--calib-timesteps"),
    ({"method": "kmeans", "bits": 1.5, "online_batch": 8}, "--online-batch")])
def test_a_flag_the_method_or_mode_ignores_is_refused(overrides, flag):
    """usage.md: flags that do nothing are errors (mutation: the check not run -> the run goes ahead silently)."""
    with pytest.raises(UserError, match=f"^{flag} does nothing here: .*; drop it"):
        load_config(overrides=overrides)


def test_every_ignored_key_is_named_at_once_as_a_flag_or_a_keyword():
    """A new user's trial: quantize_transformer(pipe, method="rtn", **quick) named one ignored key, as a flag
    (--calib-samples), and the user fixed them one at a time. Now every one is named, grouped by why, as flags on the
    command line and as keywords from the API (mutations: the first only; flags for keywords)."""
    overrides = {"method": "rtn", "iters": 5, "steps": 40, "dim": 2}
    with pytest.raises(UserError, match=r"^--dim does nothing here: --method rtn rounds .*\); --iters, --steps do "
                                        r"nothing here: --method rtn does not calibrate; drop them$"):
        load_config(overrides=overrides)
    with pytest.raises(UserError, match=r"^dim does nothing here: .*; iters, steps do nothing here: .*; drop them$"):
        load_config(overrides=overrides, source="quantize_transformer keywords")


def test_a_preset_may_carry_keys_the_chosen_method_ignores():
    """One preset serves every --method (run.sh: --config digits_w2 --method kmeans): only keys given on the
    command line are checked (mutation: the check applied to the preset's keys -> refused)."""
    config = load_config("digits_w2", overrides={"method": "kmeans", "wbits": 2})
    assert config.method == "kmeans"
    assert load_config(overrides={"calib": "online", "online_batch": 8}).teacher.online_batch == 8


def test_flags_read_by_keeps_each_flag_with_its_value_or_alone():
    """One set of extra flags for every method (bench_quality, tests): rtn reads --seed, not --iters or
    --split-qkv (which takes no value); vq4dit reads all three (mutation: a valueless flag taking the next flag as
    its value -> --seed dropped with it, or kept for rtn)."""
    argv = ["--iters", "50", "--split-qkv", "--seed", "1"]
    assert flags_read_by({"method": "rtn"}, argv) == ["--seed", "1"]
    assert flags_read_by({"method": "vq4dit"}, argv) == argv
    steps = ["--calib-samples", "2", "--calib-timesteps", "2"]  # the authors' recipe (online) reads the first only
    assert flags_read_by({"recipe": "authors"}, steps) == steps[:2]


@pytest.mark.parametrize("overrides", [{"recipe": "authors"}, {"calib": "online"}, {"method": "kmeans", "bits": 1.5}])
def test_a_default_calib_timesteps_that_is_not_read_does_not_refuse_a_short_run(overrides):
    """--recipe authors (online calibration) and --bits without calibration read neither --calib-timesteps nor, for
    the latter, --calib-samples, yet the default 12 kept steps refused --steps 4 and named the flag that does nothing
    (a fourth new user's trial); the dry run's plan must not fail on it either. Mutations: the kept-steps check made
    whatever the mode (refused), the plan taking calib_timesteps as given (calib_steps' ValueError)."""
    from tests.cli_helpers import run_here

    assert load_config(overrides={**overrides, "steps": 4}).teacher.steps == 4
    with pytest.raises(UserError, match="give --calib-timesteps 4 or fewer"):
        load_config(overrides={"steps": 4})  # a block-wise run reads it
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    proc = run_here("quantize.py", *flags, "--steps", "4", "--dry-run", "-q")
    assert proc.returncode == 0, proc.stderr[-500:]
