"""`python -m vq4dit CMD ...` is the command CMD's own entry point (vq4dit/__main__.py), and the package's root
import stays torch-free, so that config errors and --help answer without loading torch."""
import subprocess
import sys

import pytest

from vq4dit.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_python_m_runs_the_same_command_as_the_script():
    """Mutation: __main__ dispatching to another command, or dropping the flags -> the outputs differ."""
    via_m = run("-m", "vq4dit", "quantize", "--config", "digits_w3", "--seed", "5", "--dry-run")
    via_script = run("quantize.py", "--config", "digits_w3", "--seed", "5", "--dry-run")
    assert via_m.returncode == via_script.returncode == 0, via_m.stderr
    assert via_m.stdout == via_script.stdout and "seed: 5" in via_m.stdout and "wbits: 3" in via_m.stdout


@pytest.mark.parametrize("argv, code, text", [
    ([], 2, "usage: python -m vq4dit"), (["--help"], 0, "usage"), (["quantise"], 2, "unknown command 'quantise'"),
    (["--version"], 0, "vq4dit 0."), (["sample", "--version"], 0, "vq4dit 0.")])
def test_a_missing_or_unknown_command_is_one_line(argv, code, text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    assert exit_info.value.code == code and text in out.out + out.err


def test_the_package_root_and_config_import_without_torch():
    """Mutation: vq4dit/__init__.py importing its public names eagerly -> torch is imported."""
    probe = run("-c", "import sys, vq4dit, vq4dit.jobs.config; print('torch' in sys.modules, vq4dit.__version__)")
    assert probe.returncode == 0 and probe.stdout.split()[0] == "False", probe.stderr


@pytest.mark.parametrize("command", ["quantize", "evaluate"])  # the two whose help shows examples
@pytest.mark.parametrize("argv0, shown", [("vq4dit-{c}", "vq4dit-{c}"),
                                          ("python -m vq4dit {c}", "python -m vq4dit {c}"),
                                          ("/clone/{c}.py", "python {c}.py")])
def test_help_examples_are_written_as_the_command_was_started(command, argv0, shown, monkeypatch, capsys):
    """The installed vq4dit-quantize --help showed `python quantize.py ...` examples, which do not run outside a clone
    (a fourth new user's trial). Mutation: utils.cli.as_invoked returning the text unchanged -> the console
    script's and python -m's cases fail."""
    import importlib

    monkeypatch.setattr(sys, "argv", [argv0.format(c=command)])
    with pytest.raises(SystemExit):
        importlib.import_module(f"vq4dit.cli.{command}").cli(["--help"])
    out = capsys.readouterr().out
    assert f"    {shown.format(c=command)} " in out, out[-800:]
