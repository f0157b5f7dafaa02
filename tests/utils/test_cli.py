import pytest

from utils.cli import run_cli
from utils.errors import UserError


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


def test_interrupt_without_hint_propagates_and_other_errors_are_not_swallowed():
    with pytest.raises(KeyboardInterrupt):
        run_cli(fail_with(KeyboardInterrupt()), None)
    with pytest.raises(ZeroDivisionError):
        run_cli(fail_with(ZeroDivisionError()), None)


def test_main_receives_its_arguments():
    seen = []
    run_cli(seen.append, {"steps": 50})
    assert seen == [{"steps": 50}]
