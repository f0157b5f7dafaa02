"""Seeded fuzz of the entry scripts (issue 20): random flag combinations with hostile values (NaN, inf, negative,
huge, empty, unicode, wrong types, wrong kinds of file), run in this process on tiny budgets. Every case must end in
success or in exit status 2 with one error line (a UserError through run_cli, or argparse's usage error): never
another exception, and never a stray temporary file. A successful run must have written its outputs and must not
have been given an empty or blank value (one that a script took for "use the default" silently).

Issue 29 adds hazards: a share of the cases runs with its output directory locked by another run, or with the Nth
file opened for writing failing with a full disk (ENOSPC), a Ctrl-C (KeyboardInterrupt) or a SIGTERM. Such a case
must end in the one line of that hazard (`error: ... no space left` / `error: ... another run`, exit 2;
`interrupted` exit 130; `terminated (SIGTERM)` exit 143), or in any ordinary outcome when it never reached the
hazard, and must leave no temporary and no new output file. Contradictory flags are values of the specs.

A CLI is a `Cli`: its cli(argv) function, the flags that keep every run cheap, what a success writes, and a list of
`Flag` specs, each with values a user could mean and the hostile values of its kind. Another entry script is fuzzed
by a Cli of its own and one more entry in test_fuzz's parametrize. Cases run in the fixture directory, so a relative
path (e.g. quantize.py's default --out) lands there. VQ4DIT_FUZZ_SEED / VQ4DIT_FUZZ_SCALE run other or more cases
locally.
"""
import builtins
import contextlib
import dataclasses
import errno
import io
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest

from tests.cli_helpers import save_tiny_ckpt
from vq4dit.cli import evaluate, quantize, sample
from vq4dit.evaluation.classifier import DigitsClassifier, save_classifier
from vq4dit.evaluation.digits import real_digits_uint8
from vq4dit.jobs.config import ignored_by
from vq4dit.utils.knobs import key_name

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


def shown(line):
    """What a terminal shows of a stderr line (the text after its last carriage return), None for a progress bar
    (tqdm redraws its bars with \\r) or a blank."""
    text = line.rsplit("\r", 1)[-1]
    return None if not text.strip() or re.search(r"\| *\d+/\d+ \[", text) else text


def outcome(spec, argv):
    """'ok', 'usage' (argparse), 'error' (one `error:` line), 'interrupted' / 'terminated' (one line, exit 130 /
    143), or what else happened, of one in-process run; and its last stderr line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            spec.cli(argv)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 -- the point of the test: every escaping exception is a finding
            return f"{type(e).__name__}: {e}", ""
        else:
            code = 0
    lines = [text for text in map(shown, err.getvalue().splitlines()) if text is not None]
    last_line = lines[-1] if lines else ""
    if code == 0:
        missing = [f for f in spec.produces(argv) if not os.path.isfile(f)]
        return (f"exit 0 without {missing}" if missing else "ok"), last_line
    if code == 2 and lines and lines[0].startswith("usage:") and ": error: " in lines[-1]:
        return "usage", last_line
    one_line = {2: ("error", "error: "), 130: ("interrupted", "interrupted"),
                143: ("terminated", "terminated (SIGTERM)")}
    if code in one_line and len(lines) == 1 and lines[0].startswith(one_line[code][1]):
        return one_line[code][0], last_line
    return f"exit {code} with stderr {err.getvalue()[-600:]!r}", last_line


HAZARD_SHARE = 0.2  # of the cases
WRITE_HAZARDS = ("ENOSPC", "SIGINT", "SIGTERM")
# what a run that met the hazard must end in: (outcome, text of its one line)
MET = {"ENOSPC": ("error", "no space left on the device"), "SIGINT": ("interrupted", "interrupted"),
       "SIGTERM": ("terminated", "terminated (SIGTERM)"), "locked": ("error", "")}


@contextlib.contextmanager
def write_hazard(kind, nth):
    """The `nth` file this process opens for writing (builtins.open in a writing mode, os.open with O_CREAT: every
    writer of the package, and the temporaries before safetensors' own writes) meets `kind`: a full disk, Ctrl-C,
    or SIGTERM (delivered for real: run_cli's handler turns it into an exception). Yields {"met": bool}."""
    from vq4dit.utils import cli

    real_open, real_os_open, state = builtins.open, os.open, {"count": 0, "met": False}

    def hit(path):
        state["count"] += 1
        if state["count"] != nth:
            return
        state["met"] = True
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        if kind == "SIGINT":
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGTERM) is not cli._raise_terminated:  # SIGTERM would end pytest itself
            raise RuntimeError("a write outside run_cli's SIGTERM handler")
        os.kill(os.getpid(), signal.SIGTERM)

    def opened(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            hit(file)
        return real_open(file, mode, *args, **kwargs)

    def os_opened(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            hit(path)
        return real_os_open(path, flags, *args, **kwargs)

    with mock.patch.object(builtins, "open", opened), mock.patch.object(os, "open", os_opened):
        yield state


@contextlib.contextmanager
def held_lock(spec, argv):
    """The case's --out locked by another run (utils.outdir.claim_out_dir held here; yields {"met": True}), or
    nothing when --out cannot be claimed or the case writes nothing there (--check, --dry-run)."""
    from vq4dit.utils.errors import UserError
    from vq4dit.utils.outdir import claim_out_dir

    out = last(argv, "--out") if "--out" in argv[:-1] else None
    with contextlib.ExitStack() as stack:
        try:
            if out and spec.produces(argv):
                stack.enter_context(claim_out_dir(out, (), overwrite=True))
                yield {"met": True}
                return
        except UserError:
            pass
        yield {"met": False}


def pick_hazard(rng, spec):
    """None, or (kind, the number of the write it hits) for a share of the cases."""
    if rng.random() >= HAZARD_SHARE:
        return None
    kinds = WRITE_HAZARDS + (("locked",) if spec.claims else ())
    return rng.choice(kinds), rng.randint(1, spec.writes)


def judge(result, line, hazard, state, argv):
    """What is wrong with a case's (outcome, last line) under `hazard` (None: nothing), or None."""
    if state["met"]:
        kind = hazard[0]
        want, text = MET[kind]
        if kind == "locked":  # refused: an error (another run, or a flag checked before the claim) or usage
            return None if result in ("error", "usage") else f"{result} while another run held --out"
        return None if (result, text in line) == (want, True) else f"{result} ({line!r}) after {kind}"
    if result not in ("ok", "usage", "error"):
        return result
    if result == "ok" and any(not a.strip() for a in argv):  # an empty value must not fall back silently
        return "ok with an empty value"
    return None


def run_fuzz(spec, paths, cases, rng):
    """Run `cases` random cases; returns (counts per outcome and per hazard met, failures as (argv, what
    happened))."""
    fixtures = Fixtures(paths["root"])
    counts, failures = {}, []
    for _ in range(cases):
        hazard = pick_hazard(rng, spec)
        argv = [a.format(**paths) for a in case(rng, spec, rng.randint(1, 4), good=hazard is not None)]
        if hazard is None:
            context = contextlib.nullcontext({"met": False})
        else:
            context = held_lock(spec, argv) if hazard[0] == "locked" else write_hazard(*hazard)
        existed = [f for f in spec.produces(argv) if os.path.lexists(f)]
        with context as state:
            result, line = outcome(spec, argv)
        wrong = judge(result, line, hazard, state, argv)
        # a run that failed writes nothing that looks finished
        partial = [] if result == "ok" else [f for f in spec.produces(argv) if os.path.lexists(f) and
                                              f not in existed]
        stray = fixtures.restore()
        if wrong or stray or partial:
            failures.append((argv + [f"(hazard {hazard})"] * bool(hazard), "; ".join(
                filter(None, [wrong, stray and f"stray temporaries {stray}", partial and f"partial {partial}"]))))
        kind = result if result in ("ok", "usage", "error") else "failure" if wrong else result
        counts[kind] = counts.get(kind, 0) + 1
        if state["met"]:
            counts[f"met {hazard[0]}"] = counts.get(f"met {hazard[0]}", 0) + 1
    return counts, failures


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every file a template names: good inputs (a tiny checkpoint, its k-means artifact, samples) and bad ones."""
    from vq4dit.models.loading import DiTSpec
    from vq4dit.utils.imagefiles import save_samples
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
    for name, text in (("preset", PRESET), ("dup_yaml", "iters: 1\niters: 2\n"),
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
    save_samples(root / "t2i", images[:4], labels[:4] % 2, prompted=True)  # prompt indices: not digits classes
    found["t2i_samples"] = str(root / "t2i" / "samples.npz")
    found["json"] = str(root / "json_dir" / "eval.json")
    found["classifier"] = str(root / "classifier.safetensors")
    save_classifier(DigitsClassifier(width=4, feature_dim=8), found["classifier"])
    return found


@pytest.mark.parametrize("spec,cases", [(SAMPLE, 200), (EVALUATE, 100), (QUANTIZE, 90), (QUANTIZE_CALIBRATED, 16)],
                         ids=["sample", "evaluate", "quantize", "quantize-calibrated"])
def test_fuzz(spec, cases, paths, monkeypatch):
    monkeypatch.chdir(paths["root"])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rng = random.Random(f"{SEED}-{spec.cli.__module__}-{spec.budget[-1]}")
    counts, failures = run_fuzz(spec, paths, int(cases * SCALE), rng)
    report = "\n".join(f"{' '.join(repr(a[:80]) for a in argv)}\n    -> {what}" for argv, what in failures[:10])
    assert not failures, f"{len(failures)} of {int(cases * SCALE)} cases failed (seed {SEED}):\n{report}"
    # the generator reaches every outcome: a fuzzer that only ever met argparse would prove nothing
    assert min(counts.get(k, 0) for k in ("ok", "usage", "error")) >= cases // 20, counts
    # and the hazards reach the writes: each kind met in some case
    kinds = WRITE_HAZARDS + (("locked",) if spec.claims else ())
    assert all(counts.get(f"met {k}", 0) >= (cases >= 50) for k in kinds), str(counts)
