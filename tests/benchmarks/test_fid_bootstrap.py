"""The paired bootstrap behind benchmarks/results/fid_bootstrap.md: one index set per resample for every method."""
import numpy as np

from benchmarks.fid_bootstrap import paired_bootstrap
from vq4dit.evaluation.metrics import fid_from_features


def test_paired_bootstrap_resamples_every_method_with_the_same_indices():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    features = {"a": a, "same": a.copy(), "shifted": a + 1.0}
    real = rng.normal(size=(80, 3))
    boot = paired_bootstrap(features, real, resamples=4, seed=7)
    assert all(v.shape == (4,) for v in boot.values())
    np.testing.assert_array_equal(boot["a"], boot["same"])  # paired: identical samples, identical FIDs
    # slow reference: the same generator, resample by resample
    ref_rng = np.random.default_rng(7)
    for b in range(4):
        idx = ref_rng.integers(0, 50, 50)
        assert boot["shifted"][b] == fid_from_features(a[idx] + 1.0, real)
    assert len(set(boot["a"].tolist())) == 4  # the resamples differ
