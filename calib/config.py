"""The quantization config: a typed dataclass, filled from a recipe, a YAML preset, then CLI overrides.

Precedence: dataclass defaults <- the recipe's preset (configs/recipes/<recipe>.yaml; `recipe` is taken from the
command line, else from the preset, else the default) <- the YAML preset given with --config <- CLI flags.
Unknown keys are errors; the resolved config is saved beside every artifact as config.yaml.
"""
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, fields

import yaml

from utils.errors import UserError

METHODS = ("vq4dit", "kmeans", "codebook", "rtn")
CALIB_MODES = ("blockwise", "joint", "online")
RECIPES = ("vq4dit", "authors")
RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "recipes")
BLOCK_INPUTS = ("quantized", "fp")
BACKENDS = ("auto", "vq4dit", "diffusers")
CACHE_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class QuantizeConfig:
    # base model
    model: str = "DiT-Digits/2"
    ckpt: str | None = None  # None: the embedded digits model
    image_size: int | None = None  # None: taken from the checkpoint (256 for ImageNet .pt files)
    num_classes: int | None = None
    backend: str = "auto"  # auto: diffusers for a pipeline directory or hub id, else vq4dit | vq4dit | diffusers
    # text-to-image pipelines (PixArt, SD3, Flux) and layer selection
    prompts: str | None = None  # teacher prompts: a text file, one per line (None: built-in class-name prompts)
    height: int | None = None  # teacher image size in pixels (None: the pipeline's default, e.g. 1024)
    width: int | None = None
    num_frames: int | None = None  # video pipelines: teacher frames per trajectory (None: the pipeline's default)
    include: str | None = None  # regex over qualified Linear names to quantize (None: the adapter's rule)
    exclude: str | None = None  # regex of Linears kept in full precision (applied after include)
    # quantizer
    recipe: str = "vq4dit"  # vq4dit (this project's defaults) | authors (their published code, METHOD.md 3b)
    method: str = "vq4dit"  # vq4dit | kmeans (no calibration) | codebook (PQF-style) | rtn (scalar per channel)
    wbits: int = 2
    dim: int = 4
    codebook_size: int | None = None  # None: 2 ** (wbits * dim)
    candidates: int = 2
    ratio_init: str = "inverse_distance"  # or "uniform"
    split_qkv: bool = False
    kmeans_iters: int = 100
    # calibration (zero data)
    calib: str = "blockwise"  # blockwise | joint | online (one update per teacher step, the authors' recipe)
    block_inputs: str = "quantized"  # quantized: block i sees calibrated blocks < i; fp: FP inputs
    iters: int = 500
    batch_size: int = 16
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-4
    rmsprop_alpha: float = 0.9
    lambda_r: float = 0.01
    ratio_reg: str = "code"  # L_r: code = n * mean(r(1-r)) (authors' code) | paper = mean(1 - |2r - 1|)
    select_threshold: float = 0.99
    hard_fraction: float = 0.99
    # training core and k-means options (METHOD.md 3b); the defaults are the project's recipe, the authors' code
    # uses when_hard, running_min, 1 and authors
    train_codebooks: str = "always"  # always | when_hard: a codebook trains only once its layer is hard
    ratio_gate: str = "none"  # none | running_min: L_r added only above its running minimum within a trajectory
    select_every: int = 10  # progressive selection after every this many updates
    kmeans_init: str = "fast"  # fast: subsample seeding and fit, then full passes | authors: k-means++ on all
    # points, exactly kmeans_iters Lloyd iterations, empty clusters become zero, k <= largest 2^j <= N/4 per layer
    steps: int = 50
    cfg_scale: float = 1.5
    calib_samples: int = 32  # teacher trajectories (each doubled by CFG)
    calib_timesteps: int = 25  # visited timesteps kept per trajectory
    online_batch: int = 4  # calib online: samples per trajectory (4 classes in the authors' code)
    student_label_dropout: float = 0.0  # calib online: the authors' student drops labels w.p. 0.1 (training mode)
    cache_dtype: str = "fp16"  # recorded token activations: fp16 | bf16 (models whose activations pass 65504) | fp32
    max_cache_gb: float | None = 16.0  # activations beyond this many GiB go to files in cache_dir (None: no limit)
    cache_dir: str | None = None  # None: <out>/calib_cache
    # run
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu

    @property
    def k(self):
        return self.codebook_size if self.codebook_size is not None else 2 ** (self.wbits * self.dim)

    def validate(self):
        def bad(name, value, valid):
            raise UserError(f"invalid {name}={value!r}: {valid}")

        choices = {"recipe": RECIPES, "method": METHODS, "calib": CALIB_MODES, "block_inputs": BLOCK_INPUTS,
                   "backend": BACKENDS, "cache_dtype": CACHE_DTYPES,
                   "ratio_init": ("inverse_distance", "uniform"), "ratio_reg": ("code", "paper")}
        choices.update(train_codebooks=("always", "when_hard"), ratio_gate=("none", "running_min"),
                       kmeans_init=("fast", "authors"))  # training core and k-means options
        if self.select_every < 1:
            bad("select_every", self.select_every, "must be a positive integer")
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                bad(name, getattr(self, name), f"choose one of {', '.join(valid)}")
        for name in ("wbits", "dim", "candidates", "kmeans_iters", "iters", "batch_size", "steps",
                     "calib_samples", "calib_timesteps"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be a positive integer")
        if not 2 <= self.k <= 65536:
            source = ("given" if self.codebook_size is not None
                      else f"= 2^(wbits*dim) with wbits={self.wbits}, dim={self.dim}")
            bad("codebook_size", self.k, f"k {source}; k must be in 2..65536")
        if self.candidates > self.k:
            bad("candidates", self.candidates, f"at most the codebook size {self.k}")
        if self.online_batch < 1:
            bad("online_batch", self.online_batch, "must be a positive integer")
        if not 0 <= self.student_label_dropout < 1:
            bad("student_label_dropout", self.student_label_dropout, "must be in [0, 1)")
        if self.max_cache_gb is not None and self.max_cache_gb < 0:
            bad("max_cache_gb", self.max_cache_gb, "must be >= 0 (GiB), or null for no limit")
        for name in ("height", "width"):  # text-to-image pipelines and layer selection
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be a positive number of pixels, or null for the default")
        for name in ("include", "exclude"):
            try:
                re.compile(getattr(self, name) or "")
            except re.error as e:
                bad(name, getattr(self, name), f"not a regular expression ({e})")
        if self.calib_timesteps > self.steps:
            bad("calib_timesteps", self.calib_timesteps, f"at most steps={self.steps}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(name, kind, value, source):
    """`value` checked against the field type `kind` (int, float, str, bool, or X | None)."""
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    base = next(a for a in allowed if a is not type(None))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: {name}={value!r} must be of type {base.__name__}")


def merge(config, values, source):
    """A copy of `config` with `values` (a dict) applied; unknown keys name `source` and the valid keys."""
    types = {f.name: f.type for f in fields(QuantizeConfig)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(types))}")
    return dataclasses.replace(config, **{k: _coerce(k, types[k], v, source) for k, v in values.items()})


def read_yaml(path):
    """A YAML file that must hold a mapping; every problem is a UserError naming the file."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of keys to values, got {type(values).__name__}")
    return values


def load_config(path=None, overrides=None):
    """Defaults <- the recipe's preset <- YAML preset at `path` <- `overrides` (CLI values that were given)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = read_yaml(path) if path is not None else {}
    recipe = overrides.get("recipe", values.get("recipe", QuantizeConfig.recipe))
    if recipe not in RECIPES:
        raise UserError(f"invalid recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe_path = os.path.join(RECIPE_DIR, f"{recipe}.yaml")
    config = merge(QuantizeConfig(), {**read_yaml(recipe_path), "recipe": recipe}, recipe_path)
    if path is not None:
        config = merge(config, values, path)
    config = merge(config, overrides, "command line")
    return config.validate()
