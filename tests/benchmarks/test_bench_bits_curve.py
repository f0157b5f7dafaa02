"""The row specs of benchmarks/bench_bits_curve.py: FAMILY-BITS[-seedN] -> the quantize.py flags of that row."""
import pytest

from benchmarks.bench_bits_curve import parse_families, parse_row


def test_row_specs_give_each_familys_flags_and_the_calibration_seed():
    """Mutation caught: the -seedN suffix dropped (seed-1 rows would quantize with the sampling seed), or a uniform
    row given the other method (k-means rows calibrated)."""
    assert parse_row("alloc-1.25").flags == ("--method", "vq4dit", "--bits", "1.25", "--bits-settings",
                                             "256x8,256x6,64x4,256x4,64x2")
    assert parse_row("allocres-1.5").flags == ("--method", "vq4dit", "--bits", "1.5")  # the default settings
    assert parse_row("uniform-1.5-seed1").flags == ("--method", "vq4dit", "--dim", "4", "--codebook-size", "64",
                                                    "--seed", "1")
    assert parse_row("kmeans-1").flags == ("--method", "kmeans", "--wbits", "1", "--dim", "8")
    assert parse_row("rtn-3").flags == ("--method", "rtn", "--wbits", "3")
    assert parse_row("allocsub-1").flags[-2:] == ("--bits-settings", "256x16,256x8,256x6,64x4,256x4,64x2")
    spec = parse_row("alloc-2-seed1")
    assert (spec.family, spec.bits, spec.seed) == ("alloc", 2.0, 1)


def test_a_custom_family_fills_in_the_bits():
    """Mutation caught: {bits} left unformatted, or a family name with a dash split at the dash."""
    custom = parse_families(["alloc-res=--bits {bits} --residual 2"])
    spec = parse_row("alloc-res-1.5-seed1", custom)
    assert spec.family == "alloc-res"
    assert spec.flags == ("--bits", "1.5", "--residual", "2", "--seed", "1")


@pytest.mark.parametrize("key, words", [("rtn-1.5", "valid bits: 2, 3"), ("uniform-1.25", "valid: 1, 1.33"),
                                        ("lloyd-2", "valid: rtn"), ("alloc", "FAMILY-BITS")])
def test_bad_rows_name_what_is_valid(key, words):
    """Mutation caught: a row without a setting silently run at another one (e.g. RTN at 1.5 bits as W1)."""
    with pytest.raises(ValueError, match=words):
        parse_row(key)


def test_targets_are_judged_for_the_default_and_the_one_codebook_allocation():
    """Both allocation families get a line per target, judged on their own rows. Mutations: the targets read from
    the one-codebook rows only (the default's met target goes unreported), or an interval with 0 inside called not
    met -> fail."""
    from benchmarks.bench_bits_curve import target_lines

    rows = {"allocres-1.5": {"fid": 85.0}, "alloc-1.5": {"fid": 97.0}, "allocres-1": {"fid": 95.0},
            "allocres-2": {"noise_mse": 0.5, "quantize_s": 10, "quantize_cpu_s": 10},
            "uniform-2": {"noise_mse": 1.0, "quantize_s": 10, "quantize_cpu_s": 10}}
    report = {"rows": rows, "fp": {"fid": 82.5}, "versus_fp": {"allocres-1.5": [-1.0, 8.0], "alloc-1.5": [7.0, 21.0]}}
    lines = "\n".join(target_lines(report))
    assert "- met: seed 0 (--seed), 1.5 bits (allocres-1.5)" in lines
    assert "- NOT met: seed 0 (--seed), 1.5 bits (alloc-1.5)" in lines
    assert "- met: seed 0 (--seed), 1 bit (allocres-1): FID 95.0 = 1.15 x" in lines
    assert "- met: seed 0 (--seed), 2 bits (allocres-2): noise MSE 0.50 x" in lines
