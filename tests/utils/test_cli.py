import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import vq4dit.utils.cli as cli_module
from vq4dit.utils.cli import (
    MAX_SEED,
    ArgumentParser,
    check_range,
    check_sampling_args,
    parse_classes,
    run_cli,
    split_classes,
)
from vq4dit.utils.errors import RankError, UserError


def fail_with(exc):
    def main(args):
        raise exc
    return main


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(UserError("--steps 0: must be at least 1")), None)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --steps 0: must be at least 1\n"


def test_interrupt_prints_the_hint_and_exits_130(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(KeyboardInterrupt()), None, on_interrupt=lambda: "rerun to resume from block 3")
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted; rerun to resume from block 3\n"


@pytest.mark.parametrize("error, line", [(UserError("/x: cannot be written"), "error: /x: cannot be written"),
                                         (KeyboardInterrupt(), "interrupted; 4 samples kept")])
@pytest.mark.parametrize("leave", [True, False])
def test_a_failure_inside_a_progress_bar_starts_its_own_line_and_is_the_last(capsys, error, line, leave):
    """The bar a failure left open is closed before the message, which then starts a line of its own (after the bar's
    newline, or the \r of an erased leave=False bar) and is the last output (mutation: not closed -> `teacher: 0%| |
    0/4 [...]error: ...` on one line, and the bar printed again after it when collected)."""
    from tqdm import tqdm

    def main(args):
        bar = tqdm(total=4, desc="teacher", leave=leave, file=sys.stderr)
        bar.update(1)
        raise error

    with pytest.raises(SystemExit):
        run_cli(main, None, on_interrupt=lambda: "4 samples kept")
    import gc

    gc.collect()  # a bar still open would print itself now
    err = capsys.readouterr().err
    assert re.search(rf"[\r\n]{re.escape(line)}\n$", err) and err.count(line) == 1  # a left=False bar: erased, \r


def test_interrupt_without_hint_is_one_line_and_other_errors_are_not_swallowed(capsys):
    """Mutation: a Ctrl-C without a hint re-raised (sample.py's 60-line traceback)."""
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(KeyboardInterrupt()), None)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(ZeroDivisionError):
        run_cli(fail_with(ZeroDivisionError()), None)


def test_sigterm_is_one_line_exit_143_after_the_cleanup(capsys, tmp_path):
    """SIGTERM runs the same cleanup as Ctrl-C: the half-written temporary is removed (mutation: no SIGTERM handler
    -> the process dies with the temporary left; a handler that exits at once -> no cleanup)."""
    from vq4dit.utils.fileio import atomic_path

    def main(args):
        with atomic_path(tmp_path / "out.bin"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this frame before the sleep ends

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run_cli(main, None, on_interrupt=lambda: "nothing written")
    assert e.value.code == 143 and capsys.readouterr().err == "terminated (SIGTERM); nothing written\n"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/x/out.bin"),
                                   RuntimeError("Error while serializing: I/O error: No space left on device "
                                                "(os error 28)")])
def test_a_full_disk_no_writer_reported_is_one_line(capsys, error):
    """Mutation: only UserError caught -> a full disk met outside utils.fileio's writers is a traceback."""
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(error), None)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "no space left on the device" in err
    assert err.count("\n") == 1 and ("/x/out.bin" in err) == isinstance(error, OSError)


def test_main_receives_its_arguments():
    seen = []
    run_cli(seen.append, {"steps": 50})
    assert seen == [{"steps": 50}]


@pytest.mark.parametrize("text,num_classes,expected", [("1,3,5", 10, [1, 3, 5]), (" 0 , 9 ", 10, [0, 9]),
                                                        ("999", 1000, [999]), (None, 10, None)])
def test_parse_classes(text, num_classes, expected):
    assert parse_classes(text, num_classes) == expected


@pytest.mark.parametrize("text,named", [("12", "12"), ("3,-1", "-1"), ("1,10", "10")])
def test_parse_classes_errors_name_value_and_range(text, named):
    with pytest.raises(UserError) as info:
        parse_classes(text, 10)
    message = str(info.value)
    assert f"--classes {text!r}: {named} out of range" in message and "0..9" in message


@pytest.mark.parametrize("text,named", [("a,b", "a,b"), ("1.5", "1.5"), (",", "empty item"), ("1,,2", "empty item"),
                                        ("1,", "empty item"), ("", "empty item"), (" ", "empty item")])
def test_classes_syntax_errors_name_the_value_and_form(text, named):
    """Mutation: skipping empty items (today's '1,,2' -> [1, 2])."""
    for check in (split_classes, lambda t: parse_classes(t, 10), lambda t: parse_classes(t, None)):
        with pytest.raises(UserError) as info:
            check(text)
        message = str(info.value)
        assert message.startswith(f"--classes {text!r}: ") and named in message and "comma-separated" in message


def test_classes_for_a_model_without_classes_name_the_alternative():
    with pytest.raises(UserError, match="not class-conditional; give --prompt or --prompts"):
        parse_classes("1,2", None)


FINITE = "a finite number in [0.0, 100.0]"


@pytest.mark.parametrize("value,low,high,valid", [
    (float("nan"), 0.0, 100.0, FINITE), (float("inf"), 0.0, None, "a finite number >= 0.0"),
    (-float("inf"), 0.0, 100.0, FINITE), (100.5, 0.0, 100.0, FINITE), (-0.5, 0.0, 100.0, FINITE),
    (-1, 0, MAX_SEED, f"an integer in 0..{MAX_SEED}"), (MAX_SEED + 1, 0, MAX_SEED, f"an integer in 0..{MAX_SEED}"),
    (0, 1, None, "an integer >= 1")])
def test_check_range_names_flag_value_and_range(value, low, high, valid):
    with pytest.raises(UserError) as info:
        check_range("--flag", value, low, high)
    assert str(info.value) == f"--flag {value}: must be {valid}"


@pytest.mark.parametrize("value,low,high", [(0.0, 0.0, 100.0), (100.0, 0.0, 100.0), (1, 1, None),
                                            (MAX_SEED, 0, MAX_SEED), (1e300, 0.0, None)])
def test_check_range_accepts_the_bounds(value, low, high):
    assert check_range("--flag", value, low, high) == value


VALID = {"num_samples": 1, "steps": 1, "batch_size": 1, "seed": 0, "cfg_scale": 1.0}


@pytest.mark.parametrize("kwargs,named", [
    ({"seed": -1}, "--seed -1"), ({"cfg_scale": float("nan")}, "--cfg-scale nan"),
    ({"cfg_scale": -1.0}, "--cfg-scale -1.0"), ({"steps": 1001}, "--steps 1001"),
    ({"num_samples": -5}, "--num-samples -5"), ({"batch_size": 0}, "--batch-size 0")])
def test_sampling_args(kwargs, named):
    check_sampling_args(**VALID)
    with pytest.raises(UserError, match=named):
        check_sampling_args(**{**VALID, **kwargs})


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False), ("3", False)])
def test_under_torchrun_only_rank_0_prints_the_error(monkeypatch, capsys, rank, printed):
    """Every rank meets the same bad flag: the job prints it once, and every rank exits 2 (mutation: print on
    every rank)."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(UserError("--seed -1: must be an integer in 0..9")), None)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --seed -1: must be an integer in 0..9\n" if printed else "")
    parser = ArgumentParser(prog="sample.py")
    parser.add_argument("--steps", type=int)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--steps", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("argument --steps: invalid int value: 'x'" in err) == printed
    assert (err == "") != printed


def test_an_error_one_rank_meets_alone_is_printed_by_that_rank(monkeypatch, capsys):
    """A RankError (e.g. out of memory on one GPU) would be lost if only rank 0 printed."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as e:
        run_cli(fail_with(RankError("--batch-size 64: out of memory")), None)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: rank 3: --batch-size 64: out of memory\n"


def test_blank_values_are_refused_naming_the_flag():
    """Mutation: only "" refused (a blank --out ' ' would create a directory named by spaces)."""
    cli_module.check_not_blank({"--out": "dir", "--include": None})
    for value in ("", " ", "\t"):
        with pytest.raises(UserError, match=re.escape(f"--include {value!r}: empty; give a value or leave")):
            cli_module.check_not_blank({"--out": "dir", "--include": value})


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_setup_logging_quiets_info_on_ranks_other_than_0(rank, shown):
    """Under torchrun rank 0 logs progress and the other ranks warnings only (mutation: the rank ignored, so every
    process prints every line -> rank 1 shows the info line)."""
    code = ("import logging; from vq4dit.utils.cli import setup_logging; setup_logging(); "
            "logging.getLogger('x').info('progress'); logging.getLogger('x').warning('careful')")
    env = {**os.environ, "RANK": rank}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert "careful" in err
    assert ("progress" in err) == shown
