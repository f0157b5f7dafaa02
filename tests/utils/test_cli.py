import pytest

from utils.cli import parse_classes, run_cli
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


@pytest.mark.parametrize("text,num_classes,expected", [("1,3,5", 10, [1, 3, 5]), (" 0 , 9 ", 10, [0, 9]),
                                                        ("999", 1000, [999]), ("", 10, None), (None, 10, None)])
def test_parse_classes(text, num_classes, expected):
    assert parse_classes(text, num_classes) == expected


@pytest.mark.parametrize("text,named", [("12", "12"), ("3,-1", "-1"), ("1,10", "10"), ("a,b", "a,b"),
                                        ("1.5", "1.5"), (",", ",")])
def test_parse_classes_errors_name_value_and_range(text, named):
    with pytest.raises(UserError) as info:
        parse_classes(text, 10)
    message = str(info.value)
    assert named in message and "0..9" in message and "--classes" in message


def test_classes_for_a_model_without_classes_name_the_alternative():
    with pytest.raises(UserError, match="not class-conditional; give --prompt or --prompts"):
        parse_classes("1,2", None)
