"""Seeded fuzz of the entry scripts (issue 20): random flag combinations with hostile values (NaN, inf, negative,
huge, empty, unicode, wrong types, wrong kinds of file), run in this process on tiny budgets. Every case must end in
success or in exit status 2 with one error line (a UserError through run_cli, or argparse's usage error): never
another exception, and never a stray temporary file. A successful run must have written its outputs and must not
have been given an empty or blank value (one that a script took for "use the default" silently).

Issue 29 adds hazards (tests/cli_fuzz_hazards.py): a share of the cases runs with its output directory locked by another
run, or with the Nth file opened for writing failing with a full disk (ENOSPC), a Ctrl-C (KeyboardInterrupt) or a
SIGTERM. Such a case must end in the one line of that hazard (`error: ... no space left` / `error: ... another run`,
exit 2; `interrupted` exit 130; `terminated (SIGTERM)` exit 143), or in any ordinary outcome when it never reached the
hazard, and must leave no temporary and no new output file. Contradictory flags are values of the specs.

A CLI is a `Cli` (tests/cli_fuzz_specs.py): its cli(argv) function, the flags that keep every run cheap, what a success
writes, and a list of `Flag` specs, each with values a user could mean and the hostile values of its kind. Another entry
script is fuzzed by a Cli of its own and one more entry in test_fuzz's parametrize. Cases run in the fixture directory,
so a relative path (e.g. quantize.py's default --out) lands there. VQ4DIT_FUZZ_SEED / VQ4DIT_FUZZ_SCALE run other or
more cases locally.
"""
import contextlib
import io
import os
import random
import re
import shutil

import numpy as np
import pytest

from tests.cli_fuzz_hazards import WRITE_HAZARDS, held_lock, judge, pick_hazard, write_hazard
from tests.cli_fuzz_specs import EVALUATE, PRESET, QUANTIZE, QUANTIZE_CALIBRATED, SAMPLE, case
from tests.cli_helpers import save_tiny_ckpt
from vq4dit.evaluation.classifier import DigitsClassifier, save_classifier
from vq4dit.evaluation.digits import real_digits_uint8

SEED = int(os.environ.get("VQ4DIT_FUZZ_SEED", 0))
SCALE = float(os.environ.get("VQ4DIT_FUZZ_SCALE", 1))  # e.g. 10 for a longer local run


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
