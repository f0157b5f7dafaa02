"""Seeded fuzz of the entry scripts (issue 20): random flag combinations with hostile values (NaN, inf, negative,
huge, empty, unicode, wrong types, wrong kinds of file), run in this process on tiny budgets. Every case must end in
success or in exit status 2 with one error line (a UserError through run_cli, or argparse's usage error): never
another exception, and never a stray temporary file. A successful run must have written its outputs and must not
have been given an empty or blank value (one that a script took for "use the default" silently).

A CLI is a `Cli`: its cli(argv) function, the flags that keep every run cheap, what a success writes, and a list of
`Flag` specs, each with values a user could mean and the hostile values of its kind. Another entry script is fuzzed
by a Cli of its own and one more entry in test_fuzz's parametrize. Cases run in the fixture directory, so a relative
path (e.g. quantize.py's default --out) lands there. VQ4DIT_FUZZ_SEED / VQ4DIT_FUZZ_SCALE run other or more cases
locally.
"""
import contextlib
import dataclasses
import io
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from tests.cli_helpers import save_tiny_ckpt
from vq4dit.cli import evaluate, quantize, sample
from vq4dit.evaluation.classifier import DigitsClassifier, save_classifier
from vq4dit.evaluation.digits import real_digits_uint8

SEED = int(os.environ.get("VQ4DIT_FUZZ_SEED", 0))
SCALE = float(os.environ.get("VQ4DIT_FUZZ_SCALE", 1))  # e.g. 10 for a longer local run

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
), budget=("--num-samples", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu", "-q", "--out", "{out}"),
    produces=lambda argv: [] if "--check" in argv else [os.path.join(last(argv, "--out"), f)
                                                        for f in ("samples.npz", "grid.png")])

EVALUATE = Cli(evaluate.cli, (
    Flag("--samples", ("{samples}", "{samples3}"), PATHS + ("{big}", "{labels_out}")),
    Flag("--reference", ("{samples}",), PATHS + ("{samples3}", "{big}")),
    Flag("--json", ("{json}",), PATHS + ("{dir}", "{text}/eval.json")),
    Flag("--kind", ("digits",), ("imagenet", "", "Digits", "ü")),
    Flag("--ref-batch", (), PATHS),
    Flag("--classifier", ("{classifier}",), PATHS),
), budget=("--samples", "{samples}", "--classifier", "{classifier}"),
    produces=lambda argv: [last(argv, "--json")] if "--json" in argv else [])

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
), budget=("--ckpt", "{ckpt}", "--method", "rtn", "--codebook-size", "4", "--dim", "2", "--kmeans-iters", "1",
           "--iters", "1", "--batch-size", "2", "--calib-samples", "1", "--online-batch", "1", "--steps", "2",
           "--calib-timesteps", "1", "--device", "cpu", "--out", "{qout}"),
    produces=lambda argv: [] if "--dry-run" in argv else [os.path.join(last(argv, "--out"), f) for f in
                                                          ("model.safetensors", "quant_config.json", "config.yaml")])
# the same flags over a calibrating budget (record, calibrate, the resumable state): fewer cases, each costs more
QUANTIZE_CALIBRATED = dataclasses.replace(QUANTIZE, budget=QUANTIZE.budget + ("--method", "vq4dit"))


def last(argv, flag):
    """The value argparse takes for `flag`: the one given last."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def case(rng, spec, count):
    """A random argv for `spec`: its budget, then `count` flags, each with a good value or a hostile one."""
    argv = list(spec.budget)
    for flag in rng.sample(spec.flags, count):
        if flag.bad is None:
            argv.append(flag.name)
        else:
            argv += [flag.name, rng.choice(flag.good if flag.good and rng.random() < 0.4 else flag.bad)]
    return argv


class Fixtures:
    """The fuzz's directory: every case starts from its files as made (a case may write samples into the artifact,
    JSON over a text file, create --out anywhere under it), and leaves no temporary file anywhere in it."""

    def __init__(self, root):
        self.root = str(root)
        self.files = {path: _read(path) for path in self._walk()[0]}
        self.dirs = set(self._walk()[1])

    def _walk(self):
        files, dirs = [], []
        for top, subdirs, names in os.walk(self.root):
            files += [os.path.join(top, n) for n in names]
            dirs += [os.path.join(top, d) for d in subdirs]
        return files, dirs

    def restore(self):
        """Put the fixtures back; returns the temporary files the case left."""
        files, dirs = self._walk()
        stray = sorted(f for f in files if f.endswith(".tmp"))
        for path in sorted(set(dirs) - self.dirs, reverse=True):
            shutil.rmtree(path, ignore_errors=True)
        for path in set(files) - set(self.files):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        for path, content in self.files.items():
            if not os.path.lexists(path) or _read(path) != content:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.remove(path)
                shutil.rmtree(path, ignore_errors=True)
                _write(path, content)
        return stray


def _read(path):
    return ("link", os.readlink(path)) if os.path.islink(path) else ("file", open(path, "rb").read())


def _write(path, content):
    kind, value = content
    if kind == "link":
        os.symlink(value, path)
    else:
        with open(path, "wb") as f:
            f.write(value)


def outcome(spec, argv):
    """'ok', 'usage' (argparse), 'error' (one `error:` line), or what else happened, of one in-process run."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            spec.cli(argv)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 -- the point of the test: every escaping exception is a finding
            return f"{type(e).__name__}: {e}"
        else:
            code = 0
    lines = err.getvalue().splitlines()
    if code == 0:
        missing = [f for f in spec.produces(argv) if not os.path.isfile(f)]
        return f"exit 0 without {missing}" if missing else "ok"
    if code == 2 and lines and lines[0].startswith("usage:") and ": error: " in lines[-1]:
        return "usage"
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "error"
    return f"exit {code} with stderr {err.getvalue()[-600:]!r}"


def run_fuzz(spec, paths, cases, rng):
    """Run `cases` random cases; returns (counts per outcome, failures as (argv, what happened))."""
    fixtures = Fixtures(paths["root"])
    counts, failures = {}, []
    for _ in range(cases):
        argv = [a.format(**paths) for a in case(rng, spec, rng.randint(1, 4))]
        result = outcome(spec, argv)
        if result == "ok" and any(not a.strip() for a in argv):  # an empty value must not fall back silently
            result = "ok with an empty value"
        stray = fixtures.restore()
        if result not in ("ok", "usage", "error") or stray:
            failures.append((argv, f"{result}; stray temporaries {stray}" if stray else result))
        kind = result if result in ("ok", "usage", "error") else "failure"
        counts[kind] = counts.get(kind, 0) + 1
    return counts, failures


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every file a template names: good inputs (a tiny checkpoint, its k-means artifact, samples) and bad ones."""
    from vq4dit.models.loading import DiTSpec
    from vq4dit.vq.apply import quantize_linears
    from vq4dit.vq.artifact import save_quantized
    from vq4dit.vq.layer import CodebookSpec
    from vq4dit.vq.modelref import reference

    root = tmp_path_factory.mktemp("fuzz")
    found = {"root": str(root)}
    found |= {name: str(root / name) for name in ("missing", "dir", "text", "empty", "npy", "garbage", "out",
                                                 "json_dir")}
    os.makedirs(found["dir"])
    os.makedirs(found["json_dir"])
    (root / "text").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "garbage").write_bytes(bytes(range(256)) * 4)
    found["devnull"] = str(root / "devnull")
    os.symlink(os.devnull, found["devnull"])
    found["ckpt"] = str(root / "tiny.safetensors")
    model = save_tiny_ckpt(found["ckpt"])
    for layer in quantize_linears(model, CodebookSpec(4, 4, kmeans_iters=2), progress=False).values():
        layer.harden()
    found["artifact"] = str(root / "art")
    save_quantized(model, reference(model, name=DiTSpec("DiT-Digits/2", input_size=8, num_classes=10,
                                                        in_channels=1).name), found["artifact"], {"method": "kmeans"})
    found |= {"qout": str(root / "qout"), "cache": str(root / "cache")}
    for name, text in (("preset", "iters: 1\ncodebook_size: 4\n"), ("dup_yaml", "iters: 1\niters: 2\n"),
                       ("list_yaml", "- iters\n")):
        found[name] = str(root / f"{name}.yaml")
        (root / f"{name}.yaml").write_text(text)
    found["prompts"] = str(root / "prompts.txt")
    (root / "prompts.txt").write_text("a cat\n")
    images, labels = real_digits_uint8()
    np.save(found["npy"], images[:4])
    found["npy"] += ".npy"
    for name, n in (("samples", 6), ("samples3", 3)):
        found[name] = str(root / f"{name}.npz")
        np.savez(found[name], arr_0=images[:n], arr_1=labels[:n])
    found["big"] = str(root / "big.npz")
    np.savez(found["big"], arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    found["labels_out"] = str(root / "labels_out.npz")
    np.savez(found["labels_out"], arr_0=images[:3], arr_1=np.array([0, 1, 10]))
    found["json"] = str(root / "json_dir" / "eval.json")
    found["classifier"] = str(root / "classifier.safetensors")
    save_classifier(DigitsClassifier(width=4, feature_dim=8), found["classifier"])
    return found


@pytest.mark.parametrize("spec,cases", [(SAMPLE, 200), (EVALUATE, 120), (QUANTIZE, 120), (QUANTIZE_CALIBRATED, 20)],
                         ids=["sample", "evaluate", "quantize", "quantize-calibrated"])
def test_fuzz(spec, cases, paths, monkeypatch):
    monkeypatch.chdir(paths["root"])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rng = random.Random(f"{SEED}-{spec.cli.__module__}-{spec.budget[-1]}")
    counts, failures = run_fuzz(spec, paths, int(cases * SCALE), rng)
    report = "\n".join(f"{' '.join(repr(a[:80]) for a in argv)}\n    -> {what}" for argv, what in failures[:10])
    assert not failures, f"{len(failures)} of {sum(counts.values())} cases failed (seed {SEED}):\n{report}"
    # the generator reaches every outcome: a fuzzer that only ever met argparse would prove nothing
    assert min(counts.get(k, 0) for k in ("ok", "usage", "error")) >= cases // 20, counts
