"""vq4dit.quantize_transformer: a pipeline's transformer quantized in memory through quantize.py's own stages; the
saved artifact is byte for byte the one quantize.py wrote for the same config (tests/models/tiny_t2i.quantized_run),
and the in-memory model computes what that artifact loads back as."""
import copy
import dataclasses
import re

import pytest
import torch

from tests.api.tiny_lora import tiny_run
from tests.models.tiny_t2i import sd3_pipeline
from vq4dit import load_transformer, quantize_transformer
from vq4dit.models.adapters import adapter_for
from vq4dit.utils.errors import UserError
from vq4dit.vq.artifact import quantized_layers

ARTIFACT_FILES = ("model.safetensors", "quant_config.json", "config.yaml", "README.md")


def transformer_output(model):
    gen = torch.Generator().manual_seed(0)
    shapes = adapter_for(model).example_inputs(model, rows=2, latent_hw=(8, 8), tokens=5)
    with torch.no_grad():
        return model(**{k: torch.randn(v.shape, generator=gen) for k, v in shapes.items()}, return_dict=False)[0]


def test_saved_artifact_is_the_one_quantize_py_writes_and_loads_as_the_in_memory_model(tmp_path_factory, tmp_path):
    """Mutations caught: the API skipping calibration or the recorded prompts (model.safetensors differs), a model
    reference other than quantize.py's (quant_config.json differs), the in-memory codebooks left unrounded
    (the in-memory output differs from the loaded artifact's)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    transformer = pipe.transformer
    quantized = quantize_transformer(pipe, run.config, work_dir=tmp_path / "work", progress=False)
    # the student is built on a copy: pipe.transformer becomes it, the pipeline's own (the teacher) stays FP
    assert quantized.transformer is pipe.transformer and quantized.transformer is not transformer
    assert not quantized_layers(transformer) and quantized_layers(pipe.transformer)
    assert not list((tmp_path / "work").glob("calib_state/*"))
    in_memory = transformer_output(pipe.transformer)  # before save, which rounds codebooks in place
    quantized.save(tmp_path / "api")
    for name in ARTIFACT_FILES:
        assert (tmp_path / "api" / name).read_bytes() == (run.artifact / name).read_bytes(), name
    assert torch.equal(in_memory, transformer_output(load_transformer(tmp_path / "api")))


def test_a_failed_or_interrupted_run_leaves_the_pipeline_as_it_was(tmp_path_factory, tmp_path, monkeypatch,
                                                                   caplog):
    """A new user's trial: a quantize_transformer that failed (work_dir a file) or was interrupted left 40 uncalibrated
    VQ layers in pipe.transformer, and a retry was refused as already quantized. Now work_dir is checked first (a
    UserError naming it), a calibrated run builds its student on a copy, and after Ctrl-C during calibration the same
    pipe quantizes. Mutations: the student built in place again (quantized layers left after the interrupt); no
    work_dir check (an OSError after the pipeline moved)."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    import vq4dit.jobs.quantize as job

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    original = pipe.transformer
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=rf"^quantize_transformer: work_dir='{tmp_path / 'file'}' cannot be a dir"):
        quantize_transformer(pipe, run.config, work_dir=tmp_path / "file", progress=False)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING):
        patch.setattr(job, "record_and_calibrate", interrupted)
        quantize_transformer(pipe, run.config, work_dir=tmp_path / "work", progress=False)
    assert pipe.transformer is original and not quantized_layers(original)
    # the API's words, not quantize.py's "rerun with the same config and output directory" (a log line the CLI
    # doubled: a new user's trial)
    assert caplog.messages == [f"interrupted: the same call with work_dir={str(tmp_path / 'work')!r} resumes at "
                               "the start"]
    quantize_transformer(pipe, run.config, work_dir=tmp_path / "work", progress=False, method="kmeans")
    assert quantized_layers(pipe.transformer)


def test_save_over_another_runs_artifact_says_so_and_drops_its_log(tmp_path_factory, tmp_path, caplog):
    """A new user's trial: QuantizedTransformer.save over the artifact of another model replaced it without a word
    and kept the other run's calib_log.jsonl. Now it warns as quantize.py --out does and removes that log; a save
    into the run's own work_dir keeps its log. Mutations: no announce_replacement; the stale log kept; the run's own
    log removed; an older artifact's `model: DiT-Digits/2` named as a change (the review of the change)."""
    import logging

    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    quantized = quantize_transformer(pipe, run.config, progress=False, method="kmeans")
    other = tmp_path / "other"
    other.mkdir()
    for name in ARTIFACT_FILES:  # quantize.py's artifact of the same pipeline with the default method, and its log
        (other / name).write_bytes((run.artifact / name).read_bytes())
    (other / "calib_log.jsonl").write_text('{"name": "blocks.0"}\n')
    # as an artifact from before config.yaml left out a pipeline's default DiT name: not named as a difference
    (other / "config.yaml").write_text("model: DiT-Digits/2\n" + (other / "config.yaml").read_text())
    with caplog.at_level(logging.WARNING):
        quantized.save(other)
    warned = [r.message for r in caplog.records if "replacing the artifact there" in r.message]
    assert len(warned) == 1 and "made with another config (method 'vq4dit' -> 'kmeans'" in warned[0]
    assert "model" not in warned[0]
    assert not (other / "calib_log.jsonl").exists()
    own = dataclasses.replace(quantized, log=str(other / "calib_log.jsonl"))
    (other / "calib_log.jsonl").write_text("{}\n")
    own.save(other)
    assert (other / "calib_log.jsonl").read_text() == "{}\n"


def test_overrides_and_config_resolve_as_quantize_py_flags():
    """Keyword overrides take flat keys over the recipe's defaults (as quantize.py's flags); ckpt is the
    pipeline's source."""
    from vq4dit.jobs.config import load_config
    from vq4dit.quantize import resolved_config

    class Loaded:
        name_or_path, components = "owner/pipeline", {}

    got = resolved_config(Loaded(), None, {"wbits": 3, "iters": 7})
    assert got == load_config(overrides={"ckpt": "owner/pipeline", "wbits": 3, "iters": 7})
    assert resolved_config(Loaded(), got, {"dim": 2}) == got.replace(dim=2)
    with pytest.raises(UserError, match=r"ckpt='other/model', but the pipeline was loaded from 'owner/pipeline'"):
        resolved_config(Loaded(), None, {"ckpt": "other/model"})
    with pytest.raises(UserError, match="wbits=0"):
        resolved_config(Loaded(), None, {"wbits": 0})


@pytest.mark.parametrize("given, overrides, message", [
    ("/path/to/pipeline", {}, r"got a str; give the diffusers pipeline itself"),
    (None, {"wbitz": 2}, r"^quantize_transformer keywords: unknown key\(s\) wbitz"),
    (None, {"wbits": "two"}, r"^quantize_transformer keywords: wbits='two' must be of type int"),
    (None, {"out": "/tmp/x"}, r"out='/tmp/x': the result is returned, not written; save it with .*\.save\(DIR\)"),
    (None, {"prompts": ["a cat"]}, r"prompts=\['a cat'\]; give the path of a prompts file"),
    (None, {"device": "tpu"}, r"^quantize_transformer: device tpu: use auto, cpu, cuda or cuda:N$"),  # was --device
    (None, {"image_size": 256}, r"^quantize_transformer: image_size: not used for a pipeline's transformer \(its "
                                r"config sets the model and its sizes\); drop it$"),  # named --ckpt and --backend
])
def test_api_mistakes_name_the_api_and_what_to_give(given, overrides, message):
    """A path or pipe.transformer given for the pipeline was 'not loaded with from_pretrained' (false for the
    transformer); keyword errors were labelled 'command line:'; out= (quantize.py's flag) was an unknown key
    (mutations: the components check left out; load_config's source left at 'command line')."""
    from vq4dit.quantize import resolved_config

    class Loaded:
        name_or_path, components = "owner/pipeline", {}

    with pytest.raises(UserError, match=message):
        resolved_config(Loaded() if given is None else given, None, overrides)


def test_paths_may_be_pathlib_paths_and_save_checks_its_arguments(tmp_path):
    """A new user's trial: prompts=Path("p.txt") was refused as not a str (load_transformer takes a Path), save(None)
    was a TypeError from posixpath, and save(dir, overwrite="no") wrote as if True (mutations: no fspath; no
    argument checks)."""
    from vq4dit.quantize import QuantizedTransformer, resolved_config

    class Loaded:
        name_or_path, components = "owner/pipeline", {}

    (tmp_path / "p.txt").write_text("a cat\n")
    assert resolved_config(Loaded(), None, {"prompts": tmp_path / "p.txt"}).model.prompts == str(tmp_path / "p.txt")
    quantized = QuantizedTransformer(torch.nn.Linear(1, 1), resolved_config(Loaded(), None, {}), {})
    for args, named in (((None,), r"out_dir=None; give a directory path"), ((5,), r"out_dir=5; give"),
                        ((tmp_path / "o", "no"), r"overwrite='no'; give True or False")):
        with pytest.raises(UserError, match=rf"^QuantizedTransformer.save: {named}"):
            quantized.save(*args)
    assert not (tmp_path / "o").exists()


def test_bad_pipelines_are_one_line_errors(tmp_path):
    """A pipeline built in memory (no source for the teacher's encoders), a bf16 transformer: refused before any
    work, the pipeline untouched."""
    pipe = sd3_pipeline()
    with pytest.raises(UserError, match="not loaded with from_pretrained") as e:
        quantize_transformer(pipe, device="cpu")
    assert "\n" not in str(e.value)
    pipe.save_pretrained(tmp_path / "pipe")
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "pipe"), dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"the transformer is in torch.bfloat16; load the pipeline in float32"):
        quantize_transformer(pipe, device="cpu")
    assert not quantized_layers(pipe.transformer)


def test_uncalibrated_methods_model_in_memory_is_exactly_its_artifact(tmp_path_factory, tmp_path):
    """k-means codebooks are float32 until the artifact rounds them to fp16 (calibration rounds its own): the
    returned transformer is already the artifact's model (mutation: no codec.prepare after quantizing)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    quantized = quantize_transformer(pipe, run.config, progress=False, method="kmeans")
    # a short repr: the dataclass's printed the module tree, the config and every block's stats
    assert repr(quantized) == ("QuantizedTransformer(SD3Transformer2DModel, 29 quantized layers, method='kmeans', "
                               "wbits=2, dim=4, k=16, 0 calibrated blocks)")
    in_memory = transformer_output(pipe.transformer)
    quantized.save(tmp_path / "kmeans")
    assert torch.equal(in_memory, transformer_output(load_transformer(tmp_path / "kmeans")))


# ---- issue 29 ------------------------------------------------------------------------------------------------------

def test_config_takes_a_yaml_path_or_a_preset_name_and_contradictions_are_refused(tmp_path):
    """config="preset.yaml" was an AttributeError (mutation: only a QuantizeConfig accepted); docs/api.md's wbits=2
    with codebook_size=16, dim=4 quantized to 1 bit silently (mutation: no check_bits)."""
    from vq4dit.jobs.config import load_config
    from vq4dit.quantize import resolved_config

    class Loaded:
        name_or_path, components = "owner/pipeline", {}

    (tmp_path / "preset.yaml").write_text("iters: 7\nwbits: 3\ndim: 2\n")
    for config in (str(tmp_path / "preset.yaml"), tmp_path / "preset.yaml"):
        assert resolved_config(Loaded(), config, {"seed": 1}) == load_config(
            str(tmp_path / "preset.yaml"), {"ckpt": "owner/pipeline", "seed": 1})
    assert resolved_config(Loaded(), "sd3_medium_w2", {}) == load_config("sd3_medium_w2", {"ckpt": "owner/pipeline"})
    with pytest.raises(UserError, match=r"^quantize_transformer: config=\{'wbits': 2\}; give a YAML preset's path"):
        resolved_config(Loaded(), {"wbits": 2}, {})
    with pytest.raises(UserError, match=r"wbits=2 with dim=4 means codebook_size 2\^\(2\*4\) = 256, but "
                                        r"codebook_size=16 is given \(1 bit\(s\) per weight\)"):
        resolved_config(Loaded(), None, {"wbits": 2, "dim": 4, "codebook_size": 16})
    assert resolved_config(Loaded(), None, {"wbits": 1, "dim": 4, "codebook_size": 16}).codebooks.k == 16


def test_a_quantized_transformer_refuses_save_pretrained_and_requantizing(tmp_path_factory, tmp_path):
    """diffusers' pipe.save_pretrained of a quantized transformer reloaded as NaN latents, and quantize_transformer
    of it was a bare StopIteration (mutations: no guard_save_pretrained in load_transformer; no quantized check; the
    components a pipeline saved before the transformer not named)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    transformer = load_transformer(run.artifact)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline), transformer=transformer)
    for save in (pipe.save_pretrained, transformer.save_pretrained):
        with pytest.raises(UserError, match=r"SD3Transformer2DModel.save_pretrained\(.*\): a quantized transformer "
                                            r"is not saved in diffusers' format .*quantized.save\(DIR\)") as info:
            save(tmp_path / "saved")
        assert "\n" not in str(info.value)
        # the pipeline's components before the transformer are on disk: named (its own pipeline is unguarded here)
        written = re.search(rf"had saved \w.*text_encoder.* into {re.escape(str(tmp_path / 'saved'))} already$",
                            str(info.value))
        assert bool(written) == (save == pipe.save_pretrained)
    assert not (tmp_path / "saved" / "transformer").exists()
    with pytest.raises(UserError) as info:  # a save of the transformer alone into a folder named so: nothing said
        transformer.save_pretrained(tmp_path / "fresh" / "transformer")
    assert "had saved" not in str(info.value)
    with pytest.raises(UserError, match=r"transformer is already quantized \(\d+ quantized layers, first "):
        quantize_transformer(pipe, device="cpu", progress=False)


def test_pipe_save_pretrained_after_quantize_transformer_writes_nothing(tmp_path_factory, tmp_path):
    """pipe.save_pretrained of the pipeline quantize_transformer quantized wrote its VAE and text encoders before the
    transformer's refusal (a new user's trial); now it refuses before writing anything, and with pipe.transformer =
    None it saves the rest, as the message says. Mutation: no pipeline guard (the VAE and encoders written)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    quantize_transformer(pipe, run.config, progress=False, method="kmeans")
    refused = r"SD3Transformer2DModel.save_pretrained\(.*transformer'\): a quantized transformer is not saved in "
    for saving in (pipe, copy.deepcopy(pipe)):  # a copy's guard checks the copy (the review: a closure checked pipe)
        with pytest.raises(UserError, match=refused + r"diffusers' format .*pipe.save_pretrained$"):
            saving.save_pretrained(tmp_path / "saved")
    pipe.transformer = torch.compile(pipe.transformer)  # the review: the compiled wrapper passed the guard
    with pytest.raises(UserError, match=refused):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.transformer = None
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "vae").is_dir() and not (tmp_path / "saved" / "transformer").exists()


def test_save_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path_factory, tmp_path, monkeypatch):
    """QuantizedTransformer.save meeting a full disk (safetensors reports it in its own exception's text): one
    UserError naming the files, and neither files nor the directory the save created; the same save on a disk with
    room writes the run's artifact byte for byte (mutation: safetensors' full disk not recognised -> a
    SafetensorError traceback)."""
    from safetensors import SafetensorError

    from vq4dit.quantize import QuantizedTransformer
    from vq4dit.vq.artifact import read_quant_config

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    run = tiny_run("sd3", tmp_path_factory)
    extra = {k: v for k, v in read_quant_config(run.artifact)["base_model"].items() if k not in ("class", "config")}
    quantized = QuantizedTransformer(load_transformer(run.artifact), run.config, extra)
    out = tmp_path / "new" / "art"
    with monkeypatch.context() as patch:
        patch.setattr("vq4dit.vq.artifact.save_file", full)
        with pytest.raises(UserError, match=r"model.safetensors \+ .*: no space left on the device") as info:
            quantized.save(out)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
    quantized.save(out)
    for name in ARTIFACT_FILES:
        assert (out / name).read_bytes() == (run.artifact / name).read_bytes(), name
