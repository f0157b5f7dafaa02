"""sample.py's flags refused before any work, each in one line naming the flag: values out of range, flags the mode
does not use (--check, --quantized, a DiT or a pipeline), sizes a model cannot take."""
import os

import pytest

from tests.cli_helpers import FAST_RUN, cli_error, leftovers
from vq4dit.cli import sample
from vq4dit.utils.errors import UserError


@pytest.mark.parametrize("flags, named", [(["--steps", "7", "--seed", "5"], "--steps, --seed: not used with --check"),
                                          (["--out", "x", "--device", "cpu"], "--device, --out: not used"),
                                          (["-q"], None)])
def test_check_refuses_the_flags_it_does_not_use(flags, named):
    """sample.py --check validates an artifact only: a sampling flag beside it did nothing and exited 0 (mutation: only
    --lora refused, as before)."""
    from vq4dit.cli.sample import build_parser, check_flags

    args = build_parser().parse_args(["--quantized", "art", "--check", *flags])
    if named is None:
        check_flags(args)
    else:
        with pytest.raises(UserError, match=f"^{named}"):
            check_flags(args)


BEFORE_ANY_WORK = [
    (["--cfg-scale", "nan"], "--cfg-scale nan: must be a finite number in [0.0, 100.0]"),
    (["--cfg-scale", "inf"], "--cfg-scale inf: must be"), (["--cfg-scale", "-1"], "--cfg-scale -1.0: must be"),
    (["--cfg-scale", "1e9"], "--cfg-scale 1000000000.0: must be"),
    (["--seed", "-1"], "--seed -1: must be an integer in 0..9223372036854775807"),
    (["--seed", str(2**63)], f"--seed {2**63}: must be"), (["--num-samples", "-3"], "--num-samples -3: must be"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"), (["--steps", "1001"], "--steps 1001: must"),
    (["--image-size", "0"], "--image-size 0: must be"), (["--num-classes", "-1"], "--num-classes -1: must be"),
    (["--quantized", "art", "--ckpt", "x.pt", "--model", "DiT-S/2"], "--model, --ckpt: not used with --quantized"),
    (["--quantized", "art", "--backend", "diffusers"], "--backend: not used with --quantized art"),
    (["--decode-weights"], "--decode-weights: only used with --quantized"),
    (["--pipeline", "p"], "--pipeline: only used with --quantized"), (["--classes", "1,,2"], "empty item"),
    (["--classes", ""], "--classes '': empty"), (["--ckpt", " "], "--ckpt ' ': empty"),
    (["--prompt", "a", "--prompts", "p.txt"], "--prompt and --prompts p.txt: give one"),
    (["--prompt", ""], "--prompt '': empty"), (["--height", "0"], "--height 0: must be"),
]


@pytest.mark.parametrize("argv,named", BEFORE_ANY_WORK, ids=[" ".join(a) for a, _ in BEFORE_ANY_WORK])
def test_numbers_and_mode_flags_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, named):
    """Mutations: no finiteness check (NaN cfg -> black images, exit 0), a flag that does nothing accepted."""
    import vq4dit.jobs.sample

    monkeypatch.setattr(vq4dit.jobs.sample, "load_for_sampling", lambda *a, **k: pytest.fail("loaded the model first"))
    line = cli_error(sample.cli, [*argv, "--out", tmp_path / "out", "-q"], capsys)
    assert named in line
    assert not (tmp_path / "out").exists()


def test_vae_with_a_model_that_has_none_is_an_error(tmp_path, capsys):
    """The embedded digits DiT works in pixel space: --vae would do nothing (mutation: --vae accepted silently)."""
    line = cli_error(sample.cli, ["--vae", "mse", "--num-samples", 2, "--steps", 2, "--device", "cpu", "-q", "--out",
                                  tmp_path / "out"], capsys)
    assert line.startswith("error: --vae mse: not used by DiT depth 6") and "drop --vae" in line
    assert leftovers(tmp_path) == []


def test_num_frames_on_an_image_model_is_refused(tmp_path, capsys):
    """Mutation: --num-frames ignored by image models (issue 29)."""
    line = cli_error(sample.cli, [*FAST_RUN, "--num-frames", "4", "--out", tmp_path / "out"], capsys)
    assert line.startswith("error: --num-frames 4: DiT depth") and "draws images, not videos" in line
    assert os.listdir(tmp_path) == []


def test_dit_flags_with_a_diffusers_pipeline_are_refused(tmp_path, capsys):
    """--model, --image-size, --num-classes shape the project's DiT; a pipeline's transformer ignored them silently
    (mutation: no check_pipeline_flags)."""
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    line = cli_error(sample.cli, [*FAST_RUN, "--ckpt", tmp_path / "pipe", "--image-size", "16", "--out",
                                  tmp_path / "out"], capsys)
    assert line.startswith(f"error: --image-size: not used with the diffusers pipeline --ckpt {tmp_path / 'pipe'}")
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_a_size_for_a_class_conditional_dit_is_refused(tmp_path, capsys):
    """--height/--width set a pipeline's size; a class-conditional DiT samples at its trained size, so they would do
    nothing (mutation: the check left out -> the run writes samples at 16 x 16)."""
    line = cli_error(sample.cli, ["--height", "16", "--num-samples", "2", "--steps", "2", "--out", tmp_path / "o",
                                  "-q"], capsys)
    assert "--height: DiT depth 6" in line and "samples at the size it was trained at" in line


def test_a_missing_artifact_with_out_inside_it_is_named_missing(tmp_path):
    """--quantized GHOST --out GHOST/samples (the docs' layout, with a typo) said `GHOST/quant_config.json: missing;
    ... (interrupted save?)`, the claim of --out having made GHOST (mutation: no check before the claim)."""
    from vq4dit.cli.sample import build_parser, check_flags

    ghost = tmp_path / "ghost"
    with pytest.raises(UserError, match=f"^--quantized {ghost}: no such directory"):
        check_flags(build_parser().parse_args(["--quantized", str(ghost), "--out", str(ghost / "samples")]))
    assert not ghost.exists()
