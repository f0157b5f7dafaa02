import os
from pathlib import Path

import pytest

from vq4dit.jobs.config import QuantizeConfig, load_config
from vq4dit.utils.errors import UserError
from vq4dit.utils.resources import CONFIG_DIR
from vq4dit.utils.yamlfile import read_yaml


def write(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("wbits,dim,k", [(2, 4, 256), (3, 2, 64), (1, 8, 256), (4, 1, 16)])
def test_codebook_size_follows_bits_and_dim(wbits, dim, k):
    assert load_config(overrides={"wbits": wbits, "dim": dim}).codebooks.k == k


@pytest.mark.parametrize("yaml_text,flags,expected", [
    ("codebook_size: 16\n", {"wbits": 3}, (3, 4, 4096, None)),
    ("wbits: 3\n", {"codebook_size": 16}, (3, 4, 16, None)),
    ("codebook_size: 16\nwbits: 1\n", {"bits": 1.5}, (2, 4, 256, 1.5)),
    ("bits: 1.5\n", {"wbits": 3}, (3, 4, 4096, None)),
    ("bits: 1.5\nbits_settings: 256x4,64x2\nbits_probe: block\n", {"wbits": 3}, (3, 4, 4096, None)),
], ids=["wbits over codebook_size", "codebook_size over wbits", "bits over a uniform setting",
        "a uniform setting over bits", "a uniform setting over bits and its settings"])
def test_a_flag_sets_aside_what_an_earlier_level_said_of_the_same_thing(tmp_path, yaml_text, flags, expected):
    """Flags come last, also where two keys say one thing: a YAML file's codebook_size 16 silently made --wbits 3
    a 1-bit run (a fourth new user's trial), and --bits beside a file's codebook_size was refused as "give either
    bits or those", which a flag cannot do. Mutation: jobs.config_merge.superseded returning {} (the first case gives k
    16, the third and fourth are refused)."""
    c = load_config(write(tmp_path, yaml_text), flags).codebooks
    assert (c.wbits, c.dim, c.k, c.bits) == expected


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path, "wbits: 3\ndim: 2\niters: 7\n")
    config = load_config(path, {"iters": 9, "seed": None})
    assert (config.codebooks.wbits, config.codebooks.dim, config.calibration.iters, config.seed) == (3, 2, 9, 0)


def test_an_empty_config_file_is_warned_about(tmp_path, caplog):
    """An empty or comments-only --config gave every default without a word (a fourth new user's trial; a typo'd or
    truncated file looks the same). Mutation: the warning left out."""
    path = write(tmp_path, "# nothing yet\n")
    with caplog.at_level("WARNING", logger="vq4dit.jobs.config"):
        assert load_config(path).to_dict() == load_config().to_dict()
    assert f"{path} holds no settings" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vq4dit.jobs.config"):
        load_config(write(tmp_path, "wbits: 3\n"))
    assert "holds no settings" not in caplog.text


def test_unknown_key_names_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "wbitz: 2\n")
    with pytest.raises(UserError, match=r"preset.yaml: unknown key\(s\) wbitz; valid keys: .*wbits"):
        load_config(path)


@pytest.mark.parametrize("text,pattern", [
    ("wbits: two\n", "wbits='two' must be of type int"),
    ("split_qkv: 1\n", "split_qkv=1 must be of type bool"),
    ("- a\n- b\n", "must be a mapping"),
    ("wbits: [\n", "not valid YAML"),
    ("stream: on\n", 'stream=True must be of type str; in YAML quote the word \\(stream: "on", not stream: on\\)'),
    ('include: ""\n', "include='' is empty; give a value or leave the key out"),
    ("ckpt: ' '\n", "ckpt=' ' is empty"),
])
def test_bad_yaml_values(tmp_path, text, pattern):
    """The fourth new user's trial wrote `stream: on`, which YAML reads as a boolean: the message now says to quote
    it (mutation: the hint left out); and an empty string, which the flags refuse, was taken (`include: ""`: the
    default layers) or named a blank checkpoint (mutation: the blank check left out)."""
    with pytest.raises(UserError, match=pattern):
        load_config(write(tmp_path, text))


def test_int_is_accepted_for_float_fields(tmp_path):
    assert load_config(write(tmp_path, "lr_ratio: 1\n")).calibration.lr_ratio == 1.0


@pytest.mark.parametrize("overrides,pattern", [
    ({"codebook_size": 1}, "codebook_size=1"),
    ({"codebook_size": 65537}, "2..65536"),
    ({"wbits": 5, "dim": 4}, "2\\^\\(wbits\\*dim\\)"),
    ({"iters": 0}, "iters=0: must be a positive integer"),
    ({"steps": -1}, "steps=-1"),
    ({"method": "gptq"}, "choose one of vq4dit"),
    ({"ratio_reg": "l1"}, "ratio_reg=.l1.: choose one of code, paper"),
    ({"candidates": 5, "codebook_size": 4}, "at most the codebook size 4"),
    ({"calib_timesteps": 60}, "at most steps=50"),
    ({"steps": 8}, r"calib_timesteps=12: at most steps=8 .*12 by default\); give --calib-timesteps 8 or fewer"),
    ({"lr_schedule": "linear"}, "lr_schedule=.linear.: choose one of constant, cosine"),
    ({"lr_schedule": "cosine", "calib": "online"}, "lr_schedule='cosine': calib online makes one update per teacher"),
])
def test_impossible_settings_are_user_errors(overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(overrides=overrides)


def test_missing_preset_file(tmp_path):
    with pytest.raises(UserError, match="cannot read config .*nope.yaml: no such file, .*presets: .*digits_w2"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("name", ["dit_xl_256_w3", "dit_xl_256_w3.yaml"])
def test_a_preset_is_named_by_its_name_from_anywhere(name, tmp_path, monkeypatch):
    """--config NAME finds the shipped preset from any working directory, as an installed wheel needs (mutation:
    names not resolved -> 'no such file'); a file of that name in the working directory wins over the preset."""
    monkeypatch.chdir(tmp_path)
    assert load_config(name) == load_config(os.path.join(CONFIG_DIR, "dit_xl_256_w3.yaml"))
    (tmp_path / name).write_text("seed: 7\n")
    assert load_config(name).seed == 7


@pytest.mark.parametrize("path", sorted(Path(CONFIG_DIR).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_resolves(path):
    config = load_config(str(path))
    assert config.to_dict()["model"] == config.model.model


def test_recipe_preset_sits_between_the_defaults_and_the_yaml(tmp_path):
    authors = load_config(overrides={"recipe": "authors"})
    a = authors.to_dict()
    assert (a["calib"], a["cfg_scale"], a["lambda_r"], a["ratio_gate"], a["train_codebooks"], a["select_every"],
            a["calib_samples"], a["kmeans_init"]) == (
        "online", 4.0, 1.0, "running_min", "when_hard", 1, 1000, "authors")
    assert load_config(overrides={"recipe": "authors", "cfg_scale": 1.5}).teacher.cfg_scale == 1.5  # CLI wins
    path = write(tmp_path, "recipe: authors\ncalib_samples: 20\n")
    from_yaml = load_config(path)
    assert (from_yaml.recipe, from_yaml.calibration.calib, from_yaml.teacher.calib_samples) == ("authors", "online", 20)
    # the CLI's recipe replaces the preset's
    assert load_config(path, {"recipe": "vq4dit"}).calibration.calib == "blockwise"
    assert load_config(path, {"recipe": "vq4dit"}).teacher.calib_samples == 20  # but the YAML's own values stay
    assert load_config().to_dict() == QuantizeConfig().to_dict()  # the vq4dit recipe is the defaults


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(UserError, match="recipe='paper': choose one of vq4dit, authors"):
        load_config(overrides={"recipe": "paper"})


def test_flat_mapping_round_trips_through_the_stage_configs():
    """Every flat key lands in exactly one stage dataclass and comes back in config.yaml's order (mutation: a key
    left out of FLAT_ORDER, or a stage field that shadows another)."""
    from vq4dit.jobs.config import FIELDS, FLAT_ORDER, OPTIONAL_KEYS, RUN_FIELDS

    names = [n for section in FIELDS.values() for n in section] + list(RUN_FIELDS)
    assert sorted(names) == sorted(FLAT_ORDER + tuple(OPTIONAL_KEYS)) and len(set(names)) == len(names)
    config = load_config(overrides={"recipe": "authors", "iters": 7, "cfg_scale": 3.0, "dim": 2, "cache_dtype": "bf16"})
    flat = config.to_dict()
    assert list(flat) == list(FLAT_ORDER)
    assert QuantizeConfig.from_flat(flat) == config
    assert (config.calibration.iters, config.teacher.cfg_scale, config.codebooks.dim, config.cache.cache_dtype) == (
        7, 3.0, 2, "bf16")


@pytest.mark.parametrize("preset, codebook_size", [(None, 16), ("digits_w3", 16), (None, 256), (None, None)])
def test_a_runs_config_yaml_loads_back_as_the_same_config(tmp_path, preset, codebook_size):
    """config.yaml, as a run writes it, given back with --config: the same config. A codebook size that overrides
    wbits (--codebook-size 16 at the default W2 d4, or over digits_w3's wbits 3) was written beside wbits and the
    file was refused as contradicting itself (mutation: wbits written whatever k is -> check_bits' error)."""
    config = load_config(preset, {"codebook_size": codebook_size, "iters": 7})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    again = load_config(str(path))
    def settings(c):  # what the run does: wbits only names k, which codebook_size overrides
        return {key: value for key, value in c.to_dict().items() if key != "wbits" or codebook_size is None}

    assert again.codebooks.k == config.codebooks.k and settings(again) == settings(config)
    assert ("wbits" in config.to_dict()) == (codebook_size in (None, 256))


@pytest.mark.parametrize("preset, model", [(None, None), ("dit_xl_256_w2", "DiT-XL/2")])
def test_a_pipeline_runs_config_yaml_leaves_out_only_the_default_dit_name(tmp_path, preset, model):
    """config.yaml of a pipeline run leaves out the default DiT name it does not use (it said model: DiT-Digits/2),
    but a preset's own (dit_xl_256_w2 with a diffusers DiT pipeline) stays: read back, the same config and run key
    (the review of the change: dropped, it came back as DiT-Digits/2, another run key, and --skip-existing remade the
    artifact; mutation: any model dropped)."""
    from vq4dit.jobs.runkey import RunKey

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    config = load_config(preset, {"ckpt": str(tmp_path / "pipe")})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert read_yaml(path).get("model") == model
    again = load_config(str(path))
    assert again == config and RunKey.of(again).digest() == RunKey.of(config).digest()


@pytest.mark.parametrize("overrides, name", [
    ({}, "digits_2_vq4dit_w2d4"), ({"codebook_size": 16}, "digits_2_vq4dit_k16d4"),
    ({"codebook_size": 256}, "digits_2_vq4dit_w2d4"), ({"bits": 1.5}, "digits_2_vq4dit_b1.5")])
def test_the_default_out_names_the_codebook_size_that_overrides_wbits(overrides, name):
    """A --codebook-size 16 run (1 bit at d 4) went to the default W2 run's directory, replacing its artifact
    (mutation: the name from wbits alone)."""
    from vq4dit.cli.quantize import default_out

    assert default_out(load_config(overrides=overrides)) == f"outputs/{name}"


def test_quantize_path_flags_expand_the_home_directory(monkeypatch, tmp_path):
    """--out=~/x and --json=~/p.json (the shell leaves ~ after = alone) name $HOME's, not a directory called ~."""
    from vq4dit.cli import quantize

    monkeypatch.setenv("HOME", str(tmp_path))
    parsed = quantize.build_parser().parse_args(["--out=~/w2", "--json=~/plan.json"])
    assert (parsed.out, parsed.json) == (str(tmp_path / "w2"), str(tmp_path / "plan.json"))


@pytest.mark.parametrize("text,pattern", [
    ("iters: 3\niters: 4\n", "duplicate key 'iters'"),
    ("lr_ratio: .nan\n", "lr_ratio=nan must be a finite number"),
    ("cfg_scale: .inf\n", "cfg_scale=inf must be a finite number"),
])
def test_duplicate_keys_and_non_finite_numbers_in_yaml(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(write(tmp_path, text))


def test_a_float_with_an_exponent_and_no_dot_is_a_number_in_yaml(tmp_path):
    """`lr_ratio: 1e-2` (YAML 1.1 reads it as a string: "must be of type float") is 0.01, as --lr-ratio 1e-2 is; a
    quoted "1e-2" stays a string (mutation: the resolver left out -> the type error)."""
    config = load_config(write(tmp_path, "lr_ratio: 1e-2\nlr_codebook: 2E-5\n"))
    assert (config.calibration.lr_ratio, config.calibration.lr_codebook) == (0.01, 2e-5)
    with pytest.raises(UserError, match="lr_ratio='1e-2' must be of type float"):
        load_config(write(tmp_path, "lr_ratio: '1e-2'\n"))


def test_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.yaml is not UTF-8 text"):
        load_config(str(path))


@pytest.mark.parametrize("overrides,pattern", [
    ({"lr_ratio": -0.05}, "lr_ratio=-0.05: must be >= 0"),
    ({"seed": -1}, "seed=-1: must be >= 0"),
    ({"cfg_scale": -1.0}, "cfg_scale=-1.0: must be >= 0"),
    ({"lambda_r": -1.0}, "lambda_r=-1.0"),
    ({"rmsprop_alpha": 1.5}, "rmsprop_alpha=1.5: must be in"),
    ({"max_cache_gb": float("nan")}, "max_cache_gb=nan must be a finite number"),
    ({"wbits": 1000}, "k = 2\\^\\(wbits\\*dim\\) with wbits=1000"),
    ({"height": 0}, "height=0: must be a positive integer"),
    ({"codebook_init": "gptq"}, "codebook_init=.gptq.: choose one of auto, kmeans, gptvq"),
    ({"codebook_init": "gptvq", "calib": "joint"}, "codebook_init='gptvq': needs block-wise .* calib joint"),
    ({"codebook_init": "gptvq", "method": "kmeans"}, "codebook_init='gptvq': needs block-wise .* method kmeans"),
])
def test_numbers_out_of_range_are_refused_before_any_work(overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(overrides=overrides)


@pytest.mark.parametrize("overrides,expected", [
    ({}, True), ({"method": "codebook"}, True), ({"calib": "joint"}, False), ({"method": "kmeans"}, False),
    ({"recipe": "authors"}, False), ({"codebook_init": "kmeans"}, False), ({"codebook_init": "gptvq"}, True),
])
def test_codebook_init_auto_is_output_aware_where_block_wise_calibration_runs(overrides, expected):
    """The default start is the output-aware fit for block-wise vq4dit/codebook and k-means elsewhere, and changing
    the mode of an already loaded default config does not turn "auto" into an error (mutation: auto resolved to
    gptvq at load, then --calib joint refused)."""
    config = load_config(overrides=overrides)
    assert config.output_aware == expected
    if config.codebooks.codebook_init != "gptvq":
        assert not config.replace(calib="joint").output_aware


YAML_ONLY = {"rmsprop_alpha", "select_threshold", "hard_fraction"}  # keys deliberately without a flag
NEEDS = {"bits_probe": {"bits": 2.0}}  # knobs whose choices apply only beside another key


def test_every_knob_is_a_flag_with_the_help_and_choices_declared_on_its_field():
    """quantize.py offers exactly one flag per config key but the YAML-only ones, with the help and type declared on
    the field and default None; validate() accepts each declared choice and refuses others naming exactly those
    (mutations: a key dropped from FLAGS; a validate() that checks its own list instead of the field's)."""
    import dataclasses
    import re

    from vq4dit.cli import quantize
    from vq4dit.jobs.config import CONFIG_KINDS, FLAT_ORDER, OPTIONAL_KEYS
    from vq4dit.utils.knobs import base_type

    actions = {a.dest: a for a in quantize.build_parser()._actions}
    knobs = {f.name: f for kind in CONFIG_KINDS for f in dataclasses.fields(kind) if "help" in f.metadata}
    assert sorted(knobs) == sorted(set(FLAT_ORDER + tuple(OPTIONAL_KEYS)) - YAML_ONLY)
    assert sorted(actions) == sorted([*knobs, "help", "version", "config", "out", "overwrite", "dry_run", "json",
                                      "verbose", "quiet", "skip_existing"])
    for name, f in knobs.items():
        action = actions[name]
        assert (action.option_strings, action.default) == ([f"--{name.replace('_', '-')}"], None)
        assert action.help.startswith(f.metadata["help"]) and "default" in action.help  # --help shows every default
        assert action.type == (None if base_type(f.type) is bool else base_type(f.type))
        choices = f.metadata.get("choices")
        if choices:
            for value in choices:
                load_config(overrides={name: value, **NEEDS.get(name, {})})
            with pytest.raises(UserError, match=f"invalid {name}='nonsense': choose one of "
                               f"{re.escape(', '.join(choices))}$"):
                load_config(overrides={name: "nonsense"})
    assert actions["split_qkv"].const is True  # a store_true switch


def test_codebook_spec_carries_the_config_with_the_methods_candidates():
    from vq4dit.vq.layer import CodebookSpec

    c = load_config(overrides={"wbits": 3, "dim": 2, "kmeans_iters": 7, "kmeans_init": "authors",
                               "ratio_init": "uniform"}).codebooks
    assert c.spec(1) == CodebookSpec(codebook_size=64, dim=2, candidates=1, kmeans_iters=7, kmeans_init="authors",
                                     ratio_init="uniform")


def test_a_preset_of_another_family_than_the_pipeline_warns(tmp_path, caplog):
    """--config flux_dev_w2 --ckpt SD3_PIPELINE ran Flux's teacher settings (28 steps, guidance 3.5) on SD3 without a
    word; now a warning names both classes. A pipeline of the preset's class (a fine-tune) gets none, nor does a
    preset without a reference model (mutations: no warning; a warning whatever the class)."""
    import json
    import logging

    from vq4dit.jobs.plan_sources import warn_preset_family

    for name, cls in (("sd3", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": "P",
                                                                      "transformer": ["diffusers", cls]}))
    with caplog.at_level(logging.WARNING, logger="vq4dit.jobs.plan_sources"):
        for preset, pipe in (("flux_dev_w2", "sd3"), ("flux_dev_w2", "flux"), ("sd3_medium_w2", "sd3"),
                             ("digits_w2", "sd3"), (None, "sd3")):
            warn_preset_family(preset, tmp_path / pipe)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("--config flux_dev_w2 is the preset of "
                                                     "black-forest-labs/FLUX.1-dev (a FluxTransformer2DModel); ")
    assert "holds a SD3Transformer2DModel" in warned[0]


@pytest.mark.parametrize("flags, named", [(["--num-frames", "8"], "num_frames: not used with the embedded digits DiT"),
                                          (["--height", "64", "--ckpt", "CKPT", "--prompts", "p.txt"],
                                           "prompts, height: not used with the DiT --ckpt")])
def test_pipeline_settings_with_a_dit_are_refused_naming_them_before_the_load(tmp_path, flags, named):
    """--num-frames, --height, --width and --prompts do nothing for a class-conditional DiT: refused by name before
    the model loads (mutation: left to the adapter's bind, after the load: `dit models are class-conditional ...`,
    naming no flag)."""
    from tests.cli_helpers import run_here, save_tiny_ckpt

    save_tiny_ckpt(tmp_path / "m.safetensors")
    (tmp_path / "p.txt").write_text("a cat\n")
    flags = [str(tmp_path / "m.safetensors") if f == "CKPT" else str(tmp_path / f) if f == "p.txt" else f
             for f in flags]
    proc = run_here("quantize.py", *flags, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {named}")
    assert not (tmp_path / "out").exists()


def test_the_default_out_of_a_pipeline_is_named_after_it(tmp_path, monkeypatch):
    """A pipeline run without --out went to outputs/digits_2_vq4dit_w2d4 (the DiT name, which a pipeline does not
    use), where the default digits run writes too (mutation: the name from --model alone)."""
    from vq4dit.cli.quantize import default_out

    (tmp_path / "My-Flux").mkdir()
    (tmp_path / "My-Flux" / "model_index.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "My-Flux")  # named as given, not as its target (the review)
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for ckpt, name in ((str(tmp_path / "My-Flux") + "/", "my-flux"), ("My-Flux", "my-flux"), ("link", "link"),
                       (str(snapshot), "flux.1-schnell"), ("black-forest-labs/FLUX.1-dev", "flux.1-dev")):
        assert default_out(load_config(overrides={"ckpt": ckpt})) == f"outputs/{name}_vq4dit_w2d4"


def test_quantize_quiet_shows_no_bars_or_info_and_refuses_verbose(tmp_path):
    """quantize.py -q, as sample.py -q (it was an unrecognized argument): no progress bar, no info line, the final
    `wrote DIR` kept (mutation: progress left on -> the k-means bar)."""
    import logging

    from tests.cli_helpers import run_here

    root = logging.getLogger()
    level = root.level
    try:
        proc = run_here("quantize.py", "--method", "kmeans", "--kmeans-iters", "2", "--out", tmp_path / "q", "-q")
    finally:
        root.setLevel(level)
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {tmp_path / 'q'}"
    assert "%|" not in proc.stderr and " INFO " not in proc.stderr, proc.stderr[-500:]
    assert run_here("quantize.py", "-q", "-v").returncode == 2
