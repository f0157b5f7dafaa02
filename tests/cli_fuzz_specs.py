"""The flag tables of tests/test_cli_fuzz.py (a `Cli` per entry script with its `Flag` specs: see that file's
docstring) and the random argv drawn from them. Templates ({name}) are files of its `paths` fixture.
"""
import dataclasses
import os
from dataclasses import dataclass

from vq4dit.cli import evaluate, quantize, sample
from vq4dit.jobs.keys_read import ignored_by
from vq4dit.utils.knobs import key_name

# hostile values by the kind of the flag; argparse turns some into usage errors, the scripts the rest
INTS = ("-1", "0", "-9223372036854775809", "99999999999999999999", "1e3", "1.5", "0x10", "", " ", "nan", "三", "٣",
        "2" * 400)
FLOATS = ("nan", "-nan", "inf", "-inf", "-1", "1e308", "1e309", "-0.0", "", "1,5", "0x1p3", "∞", "NaN", "1e-320")
# never a real device or system path: a bug that renames a file onto its target would replace it (as root, /dev/null
# itself); {devnull} is a symbolic link to /dev/null inside the test's directory
TEXTS = ("", " ", "\t", "ü", "日本語", "\u202e", "a" * 300, "-", ",", "1,,2", "../../..", "{devnull}", "--quiet")
PATHS = ("{missing}", "{dir}", "{text}", "{empty}", "{npy}", "{garbage}", "{ckpt}", "{artifact}", "{samples}",
         "{devnull}", "", " ", "{dir}/ü/x")


@dataclass(frozen=True)
class Flag:
    """A flag, values a user could mean (templates: {name} is a fixture path) and the hostile values to throw at it
    (None: a switch, given or not)."""

    name: str
    good: tuple = ()
    bad: tuple | None = None


@dataclass(frozen=True)
class Cli:
    cli: object  # cli(argv): the entry script's main, ending in SystemExit or returning
    flags: tuple  # Flag specs
    budget: tuple = ()  # flags given first in every case (a later flag overrides them), templates allowed
    produces: object = None  # produces(argv) -> the files a successful run must have written
    claims: bool = True  # whether it claims --out (utils/outdir.py), so that a held lock refuses it
    writes: int = 5  # files a successful run opens for writing (at least): the hazards hit one of them


SAMPLE = Cli(sample.cli, (
    Flag("--num-samples", ("1", "2", "3"), INTS + ("1000000000000",)),
    Flag("--steps", ("1", "2", "3"), INTS + ("1001",)),
    Flag("--batch-size", ("1", "2", "64", "1000000000000"), INTS),
    Flag("--seed", ("0", "7", "9223372036854775807"), INTS + ("9223372036854775808",)),
    Flag("--cfg-scale", ("1", "1.5", "4", "0", "100"), FLOATS + ("100.0001", "1e9")),
    Flag("--classes", ("0", "1,2", " 3 , 9 "), TEXTS + ("10", "-1", "1,a", "0" * 50 + "1")),
    Flag("--image-size", ("16",), INTS + ("7", "32")),
    Flag("--num-classes", ("10",), INTS + ("3",)),
    Flag("--ckpt", ("{ckpt}",), PATHS),
    Flag("--model", ("DiT-Digits/2",), TEXTS + ("DiT-S/2", "DiT-XL/2")),
    Flag("--backend", ("auto", "vq4dit"), ("diffusers", "", "DiT")),
    Flag("--quantized", ("{artifact}",), PATHS),
    Flag("--decode-weights"), Flag("--check"),
    Flag("--pipeline", (), PATHS),
    Flag("--prompt", ("a cat",), TEXTS),
    Flag("--prompts", ("{prompts}",), PATHS),
    Flag("--vae", ("ema",), TEXTS),
    Flag("--device", ("cpu", "auto"), ("cuda", "cuda:7", "gpu", "cuda:x", "", "CPU")),
    Flag("--precision", ("fp32", "bf16"), ("fp8", "", "FP32")),
    Flag("--out", ("{out}",), PATHS),
    Flag("--num-frames", (), INTS + ("4",)),  # an image model: refused whatever the value
    Flag("--overwrite"),
), budget=("--num-samples", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu", "-q", "--out", "{out}"),
    produces=lambda argv: [] if "--check" in argv else [os.path.join(last(argv, "--out"), f)
                                                        for f in ("samples.npz", "grid.png")])

EVALUATE = Cli(evaluate.cli, (
    Flag("--samples", ("{samples}", "{samples3}"), PATHS + ("{big}", "{labels_out}", "{t2i_samples}")),
    Flag("--reference", ("{samples}",), PATHS + ("{samples3}", "{big}")),
    Flag("--json", ("{json}",), PATHS + ("{dir}", "{text}/eval.json")),
    Flag("--kind", ("digits",), ("imagenet", "", "Digits", "ü")),
    Flag("--ref-batch", (), PATHS),
    Flag("--classifier", ("{classifier}",), PATHS),
), budget=("--samples", "{samples}", "--classifier", "{classifier}"),
    produces=lambda argv: [last(argv, "--json")] if "--json" in argv else [], claims=False, writes=2)

CHOICE = TEXTS + ("RTN", "Vq4DiT")
QUANTIZE = Cli(quantize.cli, (
    Flag("--config", ("{preset}",), PATHS + ("{dup_yaml}", "{list_yaml}")),
    Flag("--model", ("DiT-Digits/2",), TEXTS + ("DiT-S/2", "DiT-XL/2")),
    Flag("--ckpt", ("{ckpt}",), PATHS),
    Flag("--image-size", ("8",), INTS + ("7", "16")),
    Flag("--num-classes", ("10",), INTS + ("3",)),
    Flag("--backend", ("auto", "vq4dit"), ("diffusers", "", "DiT")),
    Flag("--recipe", ("vq4dit", "authors"), CHOICE),
    Flag("--method", ("rtn", "kmeans", "vq4dit", "codebook"), CHOICE),
    Flag("--wbits", ("2", "3"), INTS + ("17",)),
    Flag("--dim", ("1", "2"), INTS),
    Flag("--codebook-size", ("4", "8"), INTS + ("1", "65537")),
    Flag("--candidates", ("1", "2"), INTS + ("5",)),
    Flag("--ratio-init", ("uniform", "inverse_distance"), CHOICE),
    Flag("--kmeans-iters", ("1", "2"), INTS),
    Flag("--kmeans-init", ("fast", "authors"), CHOICE),
    Flag("--calib", ("blockwise", "joint", "online"), CHOICE),
    Flag("--block-inputs", ("quantized", "fp"), CHOICE),
    Flag("--iters", ("1", "2"), INTS),
    Flag("--batch-size", ("1", "2"), INTS),
    Flag("--lr-ratio", ("0.01", "0"), FLOATS),
    Flag("--lr-codebook", ("1e-4",), FLOATS),
    Flag("--lambda-r", ("0.1", "0"), FLOATS),
    Flag("--ratio-gate", ("none", "running_min"), CHOICE),
    Flag("--train-codebooks", ("always", "when_hard"), CHOICE),
    Flag("--select-every", ("1", "3"), INTS),
    Flag("--ratio-reg", ("code", "paper"), CHOICE),
    Flag("--steps", ("2", "3"), INTS + ("1001",)),
    Flag("--cfg-scale", ("1", "1.5", "4"), FLOATS + ("100.0001", "1e9")),
    Flag("--calib-samples", ("1", "2"), INTS + ("1000000000000",)),
    Flag("--online-batch", ("1", "2"), INTS + ("1000000000000",)),
    Flag("--student-label-dropout", ("0", "0.1"), FLOATS + ("1.5",)),
    Flag("--calib-timesteps", ("1", "2"), INTS + ("5",)),
    Flag("--cache-dtype", ("fp16", "bf16", "fp32"), CHOICE),
    Flag("--max-cache-gb", ("0", "1"), FLOATS),
    Flag("--cache-dir", ("{cache}",), PATHS),
    Flag("--prompts", (), PATHS + ("{prompts}",)),
    Flag("--height", (), INTS + ("64",)),
    Flag("--width", (), INTS + ("64",)),
    Flag("--num-frames", (), INTS + ("4",)),
    Flag("--include", (r"blocks\.0\.", "attn"), TEXTS + ("(", "[", "nothing-matches")),
    Flag("--exclude", ("mlp",), TEXTS + ("(", ".*")),
    Flag("--seed", ("0", "7", "9223372036854775807"), INTS + ("9223372036854775808",)),
    Flag("--device", ("cpu", "auto"), ("cuda", "cuda:7", "gpu", "cuda:x", "", "CPU")),
    Flag("--out", ("{qout}",), PATHS + ("{artifact}",)),
    Flag("--split-qkv"), Flag("--overwrite"), Flag("--dry-run"), Flag("--json", ("{json}",), PATHS),
), budget=("--config", "{preset}", "--ckpt", "{ckpt}", "--device", "cpu", "--out", "{qout}"),
    produces=lambda argv: [] if "--dry-run" in argv else [os.path.join(last(argv, "--out"), f) for f in
                                                          ("model.safetensors", "quant_config.json", "config.yaml")],
    writes=8)
# the cheap budget as a preset (a flag given with a method that ignores it is refused; a preset's key is not), so a
# drawn --config keeps it too
PRESET = ("method: rtn\ncodebook_size: 4\ndim: 2\nkmeans_iters: 1\niters: 1\nbatch_size: 2\ncalib_samples: 1\n"
          "online_batch: 1\nsteps: 2\ncalib_timesteps: 1\n")
# the same flags over a calibrating budget (record, calibrate, the resumable state): fewer cases, each costs more
QUANTIZE_CALIBRATED = dataclasses.replace(QUANTIZE, budget=QUANTIZE.budget + ("--method", "vq4dit"), writes=16)


def last(argv, flag):
    """The value argparse takes for `flag`: the one given last."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def read_flags(spec):
    """The flags a run of `spec`'s budget reads: quantize refuses a flag its method ignores, and a drawn --method
    would change which those are."""
    if spec.cli is not quantize.cli:
        return spec.flags
    method = last(spec.budget, "--method") if "--method" in spec.budget else "rtn"  # PRESET's
    ignored = ignored_by(method)
    return [f for f in spec.flags if key_name(f.name) not in ignored and f.name != "--method"]


def case(rng, spec, count, good=False):
    """A random argv for `spec`: its budget, then `count` flags, each with a good value or a hostile one (`good`:
    good values of flags the run reads only, so that the run is likely to reach its writes)."""
    argv = list(spec.budget)
    for flag in rng.sample(read_flags(spec) if good else spec.flags, count):
        if flag.bad is None:
            argv.append(flag.name)
        elif good and flag.good:
            argv += [flag.name, rng.choice(flag.good)]
        elif not good:
            argv += [flag.name, rng.choice(flag.good if flag.good and rng.random() < 0.4 else flag.bad)]
    return argv
