"""The configs of the calibration stages: the teacher's trajectories, the training, and the activation cache.

Each is a small dataclass that the quantize job's QuantizeConfig (jobs/config.py) composes; a stage receives only
the one it reads. Field names are the YAML keys and flags users write (`iters`, `cfg_scale`, ...), unchanged.
`validate()` raises a UserError naming the field, the value and the valid range.
"""
from dataclasses import dataclass

from vq4dit.utils.errors import UserError
from vq4dit.utils.knobs import declared_choices, knob

CALIB_MODES = ("blockwise", "joint", "online")
BLOCK_INPUTS = ("quantized", "fp")
STEP_DTYPES = ("fp32", "bf16")
# the recorded token activations' storage dtype, by the name users write (torch is imported only where it is used)
CACHE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def invalid(name, value, valid):
    raise UserError(f"invalid {name}={value!r}: {valid}")


def check_choices(config):
    """Every field of `config` that declares its choices (utils.knobs.knob) holds one of them."""
    for name, valid in declared_choices(config).items():
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


MAX_STEPS = 1000  # the DDPM training schedule that sampling respaces (sample.py's --steps has the same bound)


@dataclass
class TeacherConfig:
    """The zero-data teacher: FP sampler trajectories whose block calls become the calibration set."""

    steps: int = knob(50, "sampler steps of the teacher trajectory")
    cfg_scale: float = knob(1.5, "classifier-free guidance scale of the teacher trajectory")
    # each doubled by CFG (online: trajectories of online_batch samples). 64 trajectories x 12 kept steps (x 2 for
    # CFG) = 1536 points: as many as 32 x 25 gave, from twice the trajectories (digits W2: noise error 0.0025 vs
    # 0.0030, +0.6 dB PSNR; the teacher's cost doubles, issue 19 b)
    calib_samples: int = knob(64, "teacher trajectories")
    calib_timesteps: int = knob(12, "timesteps kept per trajectory")
    online_batch: int = knob(4, "calib online: samples per trajectory")  # 4 classes in the authors' code

    def validate(self):
        check_positive(self, ("steps", "calib_samples", "calib_timesteps", "online_batch"))
        check_range(self, "cfg_scale", 0, None, "must be >= 0 (1: no guidance)")
        if self.steps > MAX_STEPS:  # past int64, numpy's respacing failed with a UFuncTypeError
            invalid("steps", self.steps, f"at most {MAX_STEPS} (the training schedule's timesteps)")
        return self

    def check_kept_steps(self):
        """calib_timesteps kept of `steps`: checked where the run reads it (jobs.keys_read.ignored_keys)."""
        if self.calib_timesteps > self.steps:
            invalid("calib_timesteps", self.calib_timesteps,
                    f"at most steps={self.steps} (it counts the sampler steps kept per trajectory, "
                    f"{type(self).calib_timesteps} by default); give --calib-timesteps {self.steps} or "
                    "fewer, or more --steps")
        return self


@dataclass
class CalibConfig:
    """How the quantized layers train (docs/method.md "Calibration" and "The authors' calibration")."""

    # online: one update per teacher step, the authors' recipe
    calib: str = knob("blockwise", "blockwise | joint | online (one update per teacher sampler step)", CALIB_MODES)
    # quantized: block i sees calibrated blocks < i
    block_inputs: str = knob("quantized", "quantized (sequential) | fp (independent blocks)", BLOCK_INPUTS)
    iters: int = knob(500, "calibration iterations per block")
    batch_size: int = knob(16, "calibration batch size")
    lr_ratio: float = knob(5e-2, "RMSprop learning rate of the ratio logits")
    lr_codebook: float = knob(1e-4, "RMSprop learning rate of codebooks and biases")
    # the ratio logits keep lr_ratio either way
    lr_schedule: str = knob("constant", "constant | cosine (the codebook-and-bias learning rate falls to 0 over each "
                            "block's --iters updates, and over the end-to-end pass)", ("constant", "cosine"))
    rmsprop_alpha: float = 0.9  # YAML only, as are select_threshold and hard_fraction
    lambda_r: float = knob(0.01, "weight of the ratio regulariser")
    ratio_reg: str = knob("code", "ratio regulariser form: code (n * mean(r(1-r)), authors' code) | paper "
                          "(mean(1-|2r-1|))", ("code", "paper"))
    select_threshold: float = 0.99
    hard_fraction: float = 0.99
    # the defaults are the project's recipe; the authors' code uses when_hard, running_min and 1
    train_codebooks: str = knob("always", "always | when_hard (a codebook trains only once its layer is hard)",
                                ("always", "when_hard"))
    ratio_gate: str = knob("none", "none | running_min (L_r only above its running minimum within a trajectory)",
                           ("none", "running_min"))
    select_every: int = knob(10, "progressive selection after every this many updates")
    # the loss compared is the mean over 50 updates against the 50 before (calib/train.py)
    plateau: float = knob(0.0, "stop a block's training once every layer is hard and its mean loss over 50 updates "
                          "falls by less than this fraction (0: always --iters updates)")
    # bf16 autocast: matmuls in bfloat16, weights, gradients, optimizer state and the loss in float32
    step_dtype: str = knob("fp32", "dtype of the calibration updates' forward: fp32 | bf16 (autocast; parameters, "
                           "gradients and the loss stay float32; evaluation passes always fp32)", STEP_DTYPES)
    # gradient accumulation (calib/train.py): bounds the update's activation memory; the update equals the one-pass one
    micro_batch: int | None = knob(None, "split each update's minibatch into micro-batches of at most this many rows "
                                   "(forward and backward per micro-batch, one optimizer step; default: the whole "
                                   "minibatch in one pass)")
    # calib/endpass.py; issue 19 lever d
    e2e_iters: int = knob(0, "block-wise: after the walk, this many updates of every codebook and bias on the error "
                          "at the last block of the quantized chain (0: no end-to-end pass)")
    e2e_lr: float = knob(1e-4, "RMSprop learning rate of codebooks and biases in the end-to-end pass")
    # the authors' student drops labels w.p. 0.1 (training mode)
    student_label_dropout: float = knob(0.0, "calib online: drop the student's class labels with this probability")

    def validate(self):
        from vq4dit.calib.modes import mode_for  # a cycle at the top: calib.modes reads CALIB_MODES and `invalid` here

        check_choices(self)
        check_positive(self, ("iters", "batch_size", "select_every"))
        if self.micro_batch is not None:
            check_positive(self, ("micro_batch",))
        check_range(self, "e2e_iters", 0, None, "must be >= 0 (updates; 0: no end-to-end pass)")
        check_range(self, "e2e_lr", 0, None, "must be >= 0 (a learning rate)")
        mode_for(self.calib).validate(self)  # the mode refuses the options it ignores
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

    # bf16 for models whose activations pass 65504
    cache_dtype: str = knob("fp16", "recorded activations: fp16 | bf16 | fp32", tuple(CACHE_DTYPES))
    # None: no limit
    max_cache_gb: float | None = knob(16.0, "activations beyond this many GiB go to files in --cache-dir")
    cache_dir: str | None = knob(None, "where activations beyond --max-cache-gb go (default <out>/calib_cache)")

    def validate(self):
        check_choices(self)
        if self.max_cache_gb is not None:
            check_range(self, "max_cache_gb", 0, None, "must be >= 0 (GiB), or null for no limit")
        return self

    @property
    def dtype(self):
        import torch

        return getattr(torch, CACHE_DTYPES[self.cache_dtype])
