"""The quantize job's config: small per-stage dataclasses, composed by QuantizeConfig and filled from a recipe, a YAML
preset, then CLI overrides.

Users write one flat mapping (YAML keys and flags: `wbits`, `iters`, `cfg_scale`, ...); each key belongs to exactly
one stage's dataclass, and the saved config.yaml is that flat mapping again (old config.yaml files still load).
Precedence: dataclass defaults <- the recipe's preset (configs/recipes/<recipe>.yaml; `recipe` is taken from the
command line, else from the preset, else the default) <- the YAML preset given with --config <- CLI flags.
Unknown keys, duplicate keys, wrong types and non-finite numbers are errors naming the source.
"""
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field, fields

import yaml

from vq4dit.calib.config import CacheConfig, CalibConfig, TeacherConfig, check_choices, check_positive, invalid
from vq4dit.calib.modes import mode_for
from vq4dit.utils.errors import UserError
from vq4dit.utils.knobs import knob
from vq4dit.utils.resources import RECIPE_DIR, config_path
from vq4dit.utils.yamlfile import read_yaml

METHODS = ("vq4dit", "kmeans", "codebook", "rtn")  # jobs/methods.py registers one class per name
RECIPES = ("vq4dit", "authors")
BACKENDS = ("auto", "vq4dit", "diffusers")
CODEBOOK_INITS = ("auto", "kmeans", "gptvq")
OUTPUT_AWARE_METHODS = ("vq4dit", "codebook")  # the methods whose block-wise calibration can start from gptvq
STREAM_MODES = ("auto", "on", "off")

logger = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """Which model is quantized, and which of its Linears."""

    model: str = knob("DiT-Digits/2", "registry name, e.g. DiT-XL/2 (default DiT-Digits/2)")
    # None: the embedded digits model
    ckpt: str | None = knob(None, "checkpoint: official .pt, training .pt (ema), safetensors, diffusers dir or hub id "
                            "(default: the embedded digits model)")
    # None: taken from the checkpoint (256 for ImageNet .pt files)
    image_size: int | None = knob(None, "image size for latent models (256 or 512)")
    num_classes: int | None = knob(None, "number of classes (1000 for ImageNet)")
    backend: str = knob("auto", "auto (diffusers for a pipeline directory or hub id) | vq4dit (map into the project's "
                        "DiT) | diffusers", BACKENDS)
    # text-to-image pipelines (PixArt, SD3, Flux) and layer selection
    prompts: str | None = knob(None, "text-to-image pipelines: teacher prompts, a text file with one per line "
                               "(default: built-in class-name prompts)")
    height: int | None = knob(None, "text-to-image pipelines: teacher image height in pixels (default: the "
                              "pipeline's)")
    width: int | None = knob(None, "text-to-image pipelines: teacher image width in pixels (default: the pipeline's)")
    num_frames: int | None = knob(None, "video pipelines: teacher frames per trajectory (default: the pipeline's)")
    # None: the adapter's rule
    include: str | None = knob(None, "regex over qualified Linear names to quantize (default: every Linear in the "
                               "blocks)")
    exclude: str | None = knob(None, "regex of Linears kept in full precision (applied after --include)")

    def validate(self):
        check_choices(self)
        for name in ("image_size", "num_classes", "height", "width", "num_frames"):
            if getattr(self, name) is not None:
                check_positive(self, (name,))
        for name in ("include", "exclude"):
            try:
                re.compile(getattr(self, name) or "")
            except re.error as e:
                invalid(name, getattr(self, name), f"not a regular expression ({e})")
        return self

    def uses_pipeline(self):
        """Whether ckpt is a diffusers pipeline whose own transformer is quantized (models.pipelines.uses_pipeline),
        so the DiT fields do not apply."""
        from vq4dit.models.pipelines import uses_pipeline

        return uses_pipeline(self.ckpt, self.backend)

    def check_pipeline_flags(self, given):
        """Refuse the project DiT's settings (model, image_size, num_classes) among the values `given` {key: value
        or None} (quantize.py's flags; quantize_transformer words its own) with a diffusers pipeline checkpoint,
        whose transformer's config sets them (quantize.py recorded and ignored them), and a pipeline's (prompts,
        height, width, num_frames) with a DiT checkpoint file or the embedded model, before the load. A preset's are
        not refused: a DiT preset may name a diffusers DiT pipeline."""
        from vq4dit.models.pipelines import check_dit_flags, check_pipeline_flags

        keys = [key for key in ("model", "image_size", "num_classes") if given.get(key) is not None]
        check_pipeline_flags(self.ckpt, self.backend, {key: getattr(self, key) for key in keys})
        keys = [key for key in ("prompts", "height", "width", "num_frames") if given.get(key) is not None]
        check_dit_flags(self.ckpt, {key: getattr(self, key) for key in keys})


@dataclass
class CodebookConfig:
    """The quantizer: bits, sub-vector length, codebook size, candidates and the k-means that builds codebooks."""

    wbits: int = knob(2, "bits per weight (k = 2^(wbits*dim))")
    dim: int = knob(4, "sub-vector length d")
    codebook_size: int | None = knob(None, "codebook size k, overrides 2^(wbits*dim)")  # None: 2 ** (wbits * dim)
    candidates: int = knob(2, "candidate codewords per sub-vector n")
    ratio_init: str = knob("inverse_distance", "inverse_distance | uniform", ("inverse_distance", "uniform"))
    split_qkv: bool = knob(False, "q, k, v as three codebooks")
    kmeans_iters: int = knob(100, "Lloyd iterations")
    # authors also: empty clusters become zero, k <= largest 2^j <= N/4 per layer
    kmeans_init: str = knob("fast", "fast (subsample seeding and fit, then full passes) | authors (k-means++ on all "
                            "points, exactly --kmeans-iters Lloyd iterations, empty clusters not re-seeded)",
                            ("fast", "authors"))
    # gptvq: input-weighted k-means, GPTQ-style error feedback across column groups, codebook refit
    # (vq/weighted_kmeans.py), block-wise calibration of vq4dit or codebook only; auto: gptvq where it applies, else
    # kmeans (QuantizeConfig.output_aware says which)
    codebook_init: str = knob("auto", "kmeans (calibration starts from k-means of the weights, the paper) | gptvq "
                              "(each block's codebooks refit to its recorded inputs first: output-aware)",
                              CODEBOOK_INITS)
    # None: every layer at wbits / dim; a number: a per-layer allocation (jobs/allocation.py, vq/allocate.py)
    bits: float | None = knob(None, "average index bits per weight: each layer gets one of --bits-settings, chosen to "
                              "minimise the estimated output error (replaces --wbits, --dim, --codebook-size)")
    bits_settings: str | None = knob(None, "with --bits: the settings a layer may get, KxD or KxDxS (S residual "
                                     "stages), comma-separated (default 256x16,256x8,256x16x2,256x8x2,256x6,64x4,"
                                     "256x4,64x2: 0.5 to 3 bits)")
    bits_probe: str = knob("model", "with --bits: how each layer's sensitivity is measured: model (noise on one "
                           "layer, the whole model run, per layer) | block (noise on a block's layers, the whole model "
                           "run, per block; the block alone splits it between its layers: cheaper, and it streams)",
                           ("model", "block"))

    @property
    def k(self):
        return self.codebook_size if self.codebook_size is not None else 2 ** (self.wbits * self.dim)

    @property
    def overrides_wbits(self):
        """Whether codebook_size gives another k than wbits would (wbits then names nothing about the run)."""
        return self.k != 2 ** (self.wbits * self.dim)

    def label(self):
        """The quantizer in words, for a memory plan's title: "W2 (k 256, d 4)"; with --bits, that the plan sizes the
        layers (and the artifact) as the uniform one, the allocation being chosen at run time."""
        uniform = f"W{self.wbits} (k {self.k}, d {self.dim})"
        if self.bits is None:
            return uniform
        return (f"--bits {self.bits:g} (per-layer settings chosen at run time; layers and artifact sized here as "
                f"{uniform}, an upper bound where the settings offered are at most that)")

    def spec(self, candidates):
        """The vq.layer.CodebookSpec of these settings, with `candidates` per sub-vector (the method's: 1 for the
        methods that never soften a layer)."""
        from vq4dit.vq.layer import CodebookSpec  # here: vq imports torch, which --dry-run and config errors never load

        return CodebookSpec(self.k, self.dim, candidates=candidates, kmeans_iters=self.kmeans_iters,
                            kmeans_init=self.kmeans_init, ratio_init=self.ratio_init)

    def validate(self):
        check_choices(self)
        check_positive(self, ("wbits", "dim", "candidates", "kmeans_iters"))
        if self.wbits * self.dim > 16 or not 2 <= self.k <= 65536:
            source = ("given" if self.codebook_size is not None
                      else f"= 2^(wbits*dim) with wbits={self.wbits}, dim={self.dim}")
            invalid("codebook_size", self.k if self.wbits * self.dim <= 64 else f"2^{self.wbits * self.dim}",
                    f"k {source}; k must be in 2..65536")
        if self.candidates > self.k:
            invalid("candidates", self.candidates, f"at most the codebook size {self.k}")
        if self.bits is not None or self.bits_settings is not None or self.bits_probe != "model":
            self.validate_bits()
        return self

    def validate_bits(self):
        """--bits replaces the uniform setting: wbits, dim and codebook_size stay at their defaults, and every setting
        offered holds at least `candidates` codewords."""
        from vq4dit.vq.allocate import parse_settings  # here: vq imports torch (see spec)

        if self.bits is None:
            name = "bits_settings" if self.bits_settings is not None else "bits_probe"
            invalid(name, getattr(self, name), "only with bits (the average bit budget)")
        uniform = {name: getattr(self, name) for name in ("wbits", "dim", "codebook_size")}
        if uniform != {"wbits": 2, "dim": 4, "codebook_size": None}:
            given = ", ".join(f"{k}={v}" for k, v in uniform.items() if v is not None)
            invalid("bits", self.bits, f"replaces wbits, dim and codebook_size; give either bits or those ({given})")
        try:
            settings = parse_settings(self.settings_text)
        except ValueError as e:
            invalid("bits_settings", self.bits_settings, str(e))
        if not settings[0].bits <= self.bits:
            invalid("bits", self.bits, f"below the fewest bits a setting offers ({settings[0]}: "
                    f"{settings[0].bits:.3g} bits per weight)")
        small = [str(s) for s in settings if s.k < self.candidates]
        if small:
            invalid("bits_settings", self.settings_text, f"{', '.join(small)} hold fewer codewords than candidates="
                    f"{self.candidates}")

    @property
    def settings_text(self):
        from vq4dit.vq.allocate import DEFAULT_SETTINGS

        return self.bits_settings if self.bits_settings is not None else DEFAULT_SETTINGS


@dataclass
class QuantizeConfig:
    """Everything a quantize run computes from: the run's own fields and one dataclass per stage."""

    # authors: docs/method.md "The authors' calibration"
    recipe: str = knob("vq4dit", "vq4dit (this project's defaults) | authors (the authors' published code: online, "
                       "CFG 4, L_r gate, codebooks frozen while soft; configs/recipes/authors.yaml)", RECIPES)
    method: str = knob("vq4dit", "vq4dit (default) | kmeans (no calibration) | codebook (PQF-style) | rtn (scalar "
                       "per channel)", METHODS)
    seed: int = knob(0, "random seed")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")  # auto: cuda when present, else cpu
    # jobs/streaming.py; the result does not depend on it (the same artifact either way)
    stream: str = knob("auto", "auto (on when the memory plan's device peak exceeds the device's memory; off on the "
                       "CPU) | on (the teacher stays on the host in its stored dtype, its blocks move to the device "
                       "one at a time) | off", STREAM_MODES)
    model: ModelSpec = field(default_factory=ModelSpec)
    codebooks: CodebookConfig = field(default_factory=CodebookConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def validate(self):
        check_choices(self)
        if self.seed < 0:
            invalid("seed", self.seed, "must be >= 0")
        for section in SECTIONS:
            getattr(self, section).validate()
        from vq4dit.jobs.keys_read import ignored_keys  # it reads this module's fields

        if "calib_timesteps" not in ignored_keys(self):  # a default 12 > --steps 4 is no error where it is not read
            self.teacher.check_kept_steps()
        if self.codebooks.bits is not None and self.method == "rtn":
            invalid("bits", self.codebooks.bits, "allocates codebook settings: methods vq4dit, kmeans or codebook, not "
                    "rtn (which takes wbits)")
        if self.codebooks.codebook_init == "gptvq" and not self.gptvq_applies:
            invalid("codebook_init", "gptvq", f"needs block-wise calibration (calib blockwise, method vq4dit or "
                    f"codebook), got calib {self.calibration.calib} with method {self.method}")
        return self

    @property
    def gptvq_applies(self):
        """The output-aware fit refits each block's codebooks when the walk reaches it: block-wise modes only."""
        return self.method in OUTPUT_AWARE_METHODS and mode_for(self.calibration.calib).walks_blocks

    @property
    def output_aware(self):
        """Whether calibration starts from the output-aware fit (codebook_init gptvq, or auto where it applies)."""
        init = self.codebooks.codebook_init
        return init == "gptvq" or (init == "auto" and self.gptvq_applies)

    @classmethod
    def from_flat(cls, values):
        """A config from a flat {key: value} mapping (keys as in config.yaml; missing keys take their defaults)."""
        run = {k: v for k, v in values.items() if k in RUN_FIELDS}
        parts = {s: kind(**{k: v for k, v in values.items() if k in FIELDS[s]}) for s, kind in SECTIONS.items()}
        return cls(**run, **parts)

    def to_dict(self):
        """The flat mapping users write, in the order config.yaml has always had."""
        flat = {name: getattr(self, name) for name in RUN_FIELDS}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        order = FLAT_ORDER + tuple(name for name in OPTIONAL_KEYS if flat[name] != OPTIONAL_KEYS[name])
        if self.codebooks.overrides_wbits:  # written beside k, the file would contradict itself (check_bits)
            order = tuple(name for name in order if name != "wbits")
        return {name: flat[name] for name in order}

    def recorded(self):
        """What config.yaml records: to_dict without `model` when it is the default DiT name and ckpt a pipeline's
        transformer, which does not use it (read back, the default fills it in: the same config and run key; a
        preset's DiT name, e.g. dit_xl_256_w2 with a diffusers DiT pipeline, stays)."""
        flat = self.to_dict()
        if flat["model"] == ModelSpec.model and self.model.uses_pipeline():
            del flat["model"]
        return flat

    def to_yaml(self):
        return yaml.safe_dump(self.recorded(), sort_keys=False)

    def replace(self, source="replace", **values):
        """A validated copy with flat keys set as a YAML preset or flags would set them (e.g. iters=10); errors name
        `source` as where they came from."""
        from vq4dit.jobs.config_merge import merge  # it builds configs of this module's classes

        return merge(self, values, source).validate()


SECTIONS = {"model": ModelSpec, "codebooks": CodebookConfig, "teacher": TeacherConfig, "calibration": CalibConfig,
            "cache": CacheConfig}
FIELDS = {section: {f.name: f.type for f in fields(kind)} for section, kind in SECTIONS.items()}
RUN_FIELDS = {f.name: f.type for f in fields(QuantizeConfig) if f.name not in SECTIONS}
KEY_TYPES = {**RUN_FIELDS, **{k: t for types in FIELDS.values() for k, t in types.items()}}
# config.yaml's key order since the first release (a flat dataclass then; num_frames joined with video pipelines)
FLAT_ORDER = ("model", "ckpt", "image_size", "num_classes", "backend", "prompts", "height", "width", "num_frames",
              "include", "exclude", "recipe", "method", "wbits", "dim", "codebook_size", "candidates", "ratio_init",
              "split_qkv", "kmeans_iters", "calib", "block_inputs", "iters", "batch_size", "lr_ratio", "lr_codebook",
              "lr_schedule", "rmsprop_alpha", "lambda_r", "ratio_reg", "select_threshold", "hard_fraction",
              "train_codebooks", "ratio_gate", "select_every", "plateau", "e2e_iters", "e2e_lr", "kmeans_init",
              "codebook_init", "steps", "cfg_scale", "calib_samples", "calib_timesteps", "online_batch",
              "student_label_dropout", "cache_dtype", "max_cache_gb", "cache_dir", "seed", "device", "step_dtype")
# keys written to config.yaml only when they differ from their default (a run without them writes the config.yaml it
# always has): {key: default}
OPTIONAL_KEYS = {"bits": None, "bits_settings": None, "bits_probe": "model", "stream": "auto", "micro_batch": None}
# the knobs (utils.knobs.knob: every key but rmsprop_alpha, select_threshold and hard_fraction, which are YAML-only) in
# the order of quantize.py --help since the flags were first listed there
FLAGS = ("model", "ckpt", "image_size", "num_classes", "backend", "recipe", "method", "wbits", "dim", "codebook_size",
         "bits", "bits_settings", "bits_probe", "candidates", "ratio_init", "kmeans_iters", "kmeans_init",
         "codebook_init", "calib", "block_inputs", "iters",
         "batch_size", "lr_ratio", "lr_codebook", "lr_schedule", "lambda_r", "ratio_gate", "train_codebooks",
         "plateau", "e2e_iters", "e2e_lr", "step_dtype", "micro_batch", "select_every", "ratio_reg", "steps",
         "cfg_scale", "calib_samples", "online_batch", "student_label_dropout", "calib_timesteps", "cache_dtype",
         "max_cache_gb", "cache_dir", "prompts", "height", "width", "num_frames", "include", "exclude", "seed",
         "device", "stream", "split_qkv")
CONFIG_KINDS = (QuantizeConfig, *SECTIONS.values())  # the dataclasses whose knobs are flags


def load_config(path=None, overrides=None, source="command line"):
    """Defaults <- the recipe's preset <- YAML preset at `path` <- `overrides` (CLI values that were given; errors
    name `source` as where they came from)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = config_path(path)
    values = read_yaml(path) if path is not None else {}
    if path is not None and not values:
        logger.warning("%s holds no settings (empty, or comments only): every value is a default or a flag", path)
    recipe = overrides.get("recipe", values.get("recipe", QuantizeConfig.recipe))
    if recipe not in RECIPES:
        raise UserError(f"invalid recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe_path = os.path.join(RECIPE_DIR, f"{recipe}.yaml")
    from vq4dit.jobs.config_merge import merge  # it builds configs of this module's classes

    config = merge(QuantizeConfig(), {**read_yaml(recipe_path), "recipe": recipe}, recipe_path)
    if path is not None:
        config = merge(config, values, path)
    config = merge(config, overrides, source)
    from vq4dit.jobs.keys_read import check_not_ignored  # it builds configs itself (ignored_by)

    return check_not_ignored(config.validate(), set(overrides) - {"recipe", "method"}, source)
