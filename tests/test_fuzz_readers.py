"""Issue 10 item 5: 500 seeded byte mutations of a quantized artifact and of two checkpoints, in-process (the
engine and its long mode: benchmarks/fuzz_readers.py); each loads to bitwise-identical outputs or is refused with
a one-line UserError. A few of the refusals are replayed through the real entry script: exit 2, one error line."""
import collections

import pytest

from benchmarks.fuzz_readers import build_subjects, failures, fuzz, make_case
from tests.cli_helpers import assert_user_error, run

MUTATIONS, SEED = 500, 0


@pytest.fixture(scope="module")
def run_500(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    subjects = build_subjects(str(work))
    return subjects, fuzz(str(work), MUTATIONS, SEED, limit=10.0, subjects=subjects)


def test_every_mutation_loads_identically_or_is_a_one_line_user_error(run_500):
    _, records = run_500
    assert len(records) == MUTATIONS
    assert failures(records) == [], failures(records)[:5]
    by_region = collections.Counter((r["subject"], r["region"], r["outcome"]) for r in records)
    regions = {(r["subject"], r["region"]) for r in records}
    assert len(regions) == 7 and all(by_region[s, g, "user_error"] >= 40 for s, g in regions)
    assert sum(r["outcome"] == "identical" for r in records) >= 1  # harmless bytes exist and load unchanged
    assert {r["kind"] for r in records} == {"flip", "overwrite", "truncate", "insert", "delete"}


@pytest.mark.parametrize("subject, region", [("artifact model.safetensors", "header"),
                                             ("artifact model.safetensors", "body"),
                                             ("artifact quant_config.json", "json"),
                                             ("checkpoint .pt", "structure")])
def test_refusals_replayed_through_sample_py(run_500, tmp_path, subject, region):
    """The first refused case of a subject and region, as the command line meets it: the same message."""
    subjects, records = run_500
    case = next(r for r in records if (r["subject"], r["region"], r["outcome"]) == (subject, region, "user_error"))
    target, _, _, mutated, _ = make_case(list(subjects.values()), case["index"], SEED)
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for name, data in target.files.items():
        (case_dir / name).write_bytes(mutated if name == target.file else data)
    if subject.startswith("artifact"):
        result = run("sample.py", "--quantized", case_dir, "--check")
    else:
        result = run("sample.py", "--ckpt", case_dir / target.file, "--steps", "2", "--num-samples", "2",
                     "--device", "cpu", "-q", "--out", tmp_path / "out")
    line = assert_user_error(result, case_dir / target.file)
    # the same message as in-process, where the case lived in another directory
    assert line.split(f"{case_dir}/", 1)[1] == case["detail"].split(f"case{case['index']}/", 1)[1]
