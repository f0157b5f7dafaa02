"""The configs of the calibration stages: the teacher's trajectories, the training, and the activation cache.

Each is a small dataclass that the quantize job's QuantizeConfig (jobs/config.py) composes; a stage receives only
the one it reads. Field names are the YAML keys and flags users write (`iters`, `cfg_scale`, ...), unchanged.
`validate()` raises a UserError naming the field, the value and the valid range.
"""
from dataclasses import dataclass

from utils.errors import UserError

CALIB_MODES = ("blockwise", "joint", "online")
BLOCK_INPUTS = ("quantized", "fp")
# the recorded token activations' storage dtype, by the name users write (torch is imported only where it is used)
CACHE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def invalid(name, value, valid):
    raise UserError(f"invalid {name}={value!r}: {valid}")


def check_choices(config, choices):
    """Every field named in `choices` {name: valid values} holds one of its values."""
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            invalid(name, getattr(config, name), f"choose one of {', '.join(valid)}")


def check_positive(config, names):
    for name in names:
        if getattr(config, name) < 1:
            invalid(name, getattr(config, name), "must be a positive integer")


def check_range(config, name, low, high, text):
    """low <= value <= high (None: unbounded on that side)."""
    value = getattr(config, name)
    if (low is not None and value < low) or (high is not None and value > high):
        invalid(name, value, text)


@dataclass
class TeacherConfig:
    """The zero-data teacher: FP sampler trajectories whose block calls become the calibration set."""

    steps: int = 50  # sampler steps of a trajectory
    cfg_scale: float = 1.5
    # 64 trajectories x 12 kept steps (x 2 for CFG) = 1536 points: as many as 32 x 25 gave, from twice the
    # trajectories (digits W2: noise error 0.0025 vs 0.0030, +0.6 dB PSNR; the teacher's cost doubles, issue 19 b)
    calib_samples: int = 64  # trajectories (each doubled by CFG); online: trajectories of online_batch samples
    calib_timesteps: int = 12  # visited timesteps kept per trajectory
    online_batch: int = 4  # calib online: samples per trajectory (4 classes in the authors' code)

    def validate(self):
        check_positive(self, ("steps", "calib_samples", "calib_timesteps", "online_batch"))
        check_range(self, "cfg_scale", 0, None, "must be >= 0 (1: no guidance)")
        if self.calib_timesteps > self.steps:
            invalid("calib_timesteps", self.calib_timesteps, f"at most steps={self.steps}")
        return self


@dataclass
class CalibConfig:
    """How the quantized layers train (METHOD.md section 3 step 4; the authors' options: section 3b)."""

    calib: str = "blockwise"  # blockwise | joint | online (one update per teacher step, the authors' recipe)
    block_inputs: str = "quantized"  # quantized: block i sees calibrated blocks < i; fp: FP inputs
    iters: int = 500
    batch_size: int = 16
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-4
    # constant | cosine: the codebook-and-bias learning rate falls from lr_codebook to 0 over each run of `iters`
    # updates (a block's, or the end-to-end pass's); the ratio logits keep lr_ratio either way
    lr_schedule: str = "constant"
    rmsprop_alpha: float = 0.9
    lambda_r: float = 0.01
    ratio_reg: str = "code"  # L_r: code = n * mean(r(1-r)) (authors' code) | paper = mean(1 - |2r - 1|)
    select_threshold: float = 0.99
    hard_fraction: float = 0.99
    # the defaults are the project's recipe; the authors' code uses when_hard, running_min and 1
    train_codebooks: str = "always"  # always | when_hard: a codebook trains only once its layer is hard
    ratio_gate: str = "none"  # none | running_min: L_r added only above its running minimum within a trajectory
    select_every: int = 10  # progressive selection after every this many updates
    # > 0: a block stops training once every layer is hard and its mean loss over 50 updates falls by less than
    # this fraction of the 50 before (calib/train.py); 0: always `iters` updates
    plateau: float = 0.0
    # block-wise: > 0 adds an end-to-end pass after the walk, this many updates of every codebook and bias on the
    # chain's last-block error (calib/endpass.py; issue 19 lever d); 0: none
    e2e_iters: int = 0
    e2e_lr: float = 1e-4  # RMSprop learning rate of codebooks and biases in the end-to-end pass
    student_label_dropout: float = 0.0  # calib online: the authors' student drops labels w.p. 0.1 (training mode)

    def validate(self):
        check_choices(self, {"calib": CALIB_MODES, "block_inputs": BLOCK_INPUTS, "ratio_reg": ("code", "paper"),
                             "lr_schedule": ("constant", "cosine"),
                             "train_codebooks": ("always", "when_hard"), "ratio_gate": ("none", "running_min")})
        check_positive(self, ("iters", "batch_size", "select_every"))
        check_range(self, "e2e_iters", 0, None, "must be >= 0 (updates; 0: no end-to-end pass)")
        check_range(self, "e2e_lr", 0, None, "must be >= 0 (a learning rate)")
        from calib.modes import mode_for  # the mode refuses the options it ignores (imports torch: not at --help)

        mode_for(self.calib).validate(self)
        check_range(self, "lr_ratio", 0, None, "must be >= 0 (a learning rate)")
        check_range(self, "lr_codebook", 0, None, "must be >= 0 (a learning rate)")
        check_range(self, "rmsprop_alpha", 0, 1, "must be in [0, 1]")
        check_range(self, "lambda_r", 0, None, "must be >= 0 (a loss weight)")
        check_range(self, "select_threshold", 0, 1, "must be in [0, 1] (a candidate ratio)")
        check_range(self, "hard_fraction", 0, 1, "must be in [0, 1]")
        check_range(self, "plateau", 0, 1, "must be in [0, 1] (a fraction of the loss; 0: off)")
        if not 0 <= self.student_label_dropout < 1:
            invalid("student_label_dropout", self.student_label_dropout, "must be in [0, 1)")
        return self


@dataclass
class CacheConfig:
    """Where the recorded activations live: memory up to max_cache_gb, memory-mapped files in cache_dir beyond."""

    cache_dtype: str = "fp16"  # recorded token activations: fp16 | bf16 (models whose activations pass 65504) | fp32
    max_cache_gb: float | None = 16.0  # None: no limit
    cache_dir: str | None = None  # None: <out>/calib_cache

    def validate(self):
        check_choices(self, {"cache_dtype": tuple(CACHE_DTYPES)})
        if self.max_cache_gb is not None:
            check_range(self, "max_cache_gb", 0, None, "must be >= 0 (GiB), or null for no limit")
        return self

    @property
    def dtype(self):
        import torch

        return getattr(torch, CACHE_DTYPES[self.cache_dtype])
