"""jobs/fit.py: --stream auto and the micro-batch chosen from the memory plan on a (fake) CUDA device. The plan is
a stand-in here whose device peak is a known function of the config, so each choice can be checked exactly; the
real plan's figures are tested in test_memory_plan.py."""
import logging
from types import SimpleNamespace

import pytest

from vq4dit.jobs.config import load_config
from vq4dit.jobs.fit import RESERVE_BYTES, fit_to_device, halvings
from vq4dit.jobs.runkey import RunKey


def fake_peak(config):
    """Unstreamed 100 bytes; streamed 20 + 2 per row the update holds at once."""
    c = config.calibration
    rows = c.micro_batch or c.batch_size
    return 100 if config.stream == "off" else 20 + 2 * rows


def fake_device(monkeypatch, usable=0):
    """A CUDA device of `usable` bytes past the reserve (state.usable = N sets it), planned by fake_peak."""
    state = SimpleNamespace(usable=usable)
    monkeypatch.setattr("vq4dit.jobs.fit.device_memory", lambda device: state.usable + RESERVE_BYTES)
    plan = lambda config: SimpleNamespace(peaks=SimpleNamespace(  # noqa: E731
        device_peak=SimpleNamespace(device_bytes=fake_peak(config))))
    monkeypatch.setattr("vq4dit.jobs.memory_plan.plan_for", plan)
    return state


@pytest.fixture
def device(monkeypatch):
    return fake_device(monkeypatch)


def test_halvings():
    """Mutation caught: the powers of two start at the batch itself (12 -> 16 rows tried first)."""
    assert halvings(16) == [16, 8, 4, 2, 1]
    assert halvings(12) == [12, 8, 4, 2, 1]
    assert halvings(1) == [1]


@pytest.mark.parametrize("usable, stream, micro_batch", [
    (100, "off", None),  # fits unstreamed (the reserve is subtracted: mutation "reserve ignored" moves the edge)
    (99, "on", None),  # streamed, the whole batch of 16 rows fits (52)
    (30, "on", 4),  # the largest micro-batch that fits: 8 rows need 36, 4 rows 28 (mutation: smallest first -> 1)
    (24, "on", 2),
])
def test_auto_streams_then_takes_the_largest_micro_batch_that_fits(device, usable, stream, micro_batch):
    device.usable = usable
    fitted = fit_to_device(load_config(overrides={"batch_size": 16}), "cuda")
    assert (fitted.stream, fitted.calibration.micro_batch) == (stream, micro_batch)


def test_nothing_fits_warns_and_takes_one_row(device, caplog):
    """Mutation caught: the last try not kept (the whole batch returned when even one row does not fit)."""
    device.usable = 21
    with caplog.at_level(logging.WARNING, logger="vq4dit.jobs.fit"):
        fitted = fit_to_device(load_config(overrides={"batch_size": 16}), "cuda")
    assert fitted.calibration.micro_batch == 1
    assert "may run out of memory" in caplog.text


def test_a_given_micro_batch_and_a_method_that_does_not_calibrate_are_kept(device):
    """Mutations caught: --micro-batch overridden by the search; a micro-batch set on a kmeans run (which has no
    update to split; config.yaml would claim one)."""
    device.usable = 30
    given = fit_to_device(load_config(overrides={"batch_size": 16, "micro_batch": 8}), "cuda")
    assert (given.stream, given.calibration.micro_batch) == ("on", 8)
    kmeans = fit_to_device(load_config(overrides={"method": "kmeans"}), "cuda")
    assert (kmeans.stream, kmeans.calibration.micro_batch) == ("on", None)


def test_the_fitted_config_resumes_the_unfitted_run(device):
    """A run fitted to a small device resumes one started elsewhere (and back): micro_batch and stream are not in
    the run key. Mutation caught: micro_batch in the run key."""
    device.usable = 30
    config = load_config(overrides={"batch_size": 16})
    fitted = fit_to_device(config, "cuda")
    assert fitted.calibration.micro_batch == 4
    assert RunKey.of(fitted) == RunKey.of(config)
    assert fitted.to_dict()["micro_batch"] == 4  # config.yaml says how it ran


def test_a_plan_that_fails_or_a_bits_run_stays_unstreamed(device, monkeypatch, caplog):
    """Mutations caught: only UserError caught from the plan (a pipeline whose tracing fails on meta tensors with a
    RuntimeError would stop a default CUDA run that worked before); --bits given the streamed path it refuses (auto
    would end a run that may fit in a UserError), or --bits --bits-probe block kept unstreamed (it streams); the
    micro-batch log formatting a missing plan (TypeError)."""
    device.usable = 30

    def tracing_fails(config):
        raise RuntimeError("meta tensors have no data")

    monkeypatch.setattr("vq4dit.jobs.memory_plan.plan_for", tracing_fails)
    assert fit_to_device(load_config(overrides={"batch_size": 16}), "cuda").stream == "off"
    monkeypatch.undo()
    device = fake_device(monkeypatch, usable=30)
    with caplog.at_level(logging.WARNING, logger="vq4dit.jobs.fit"):
        fitted = fit_to_device(load_config(overrides={"bits": 2.0}), "cuda")
    assert fitted.stream == "off" and "--bits with --bits-probe model runs unstreamed" in caplog.text
    assert fit_to_device(load_config(overrides={"bits": 2.0, "bits_probe": "block"}), "cuda").stream == "on"
    plans = iter([100, None])  # unstreamed too big; the streamed plan at the given micro-batch: none
    monkeypatch.setattr("vq4dit.jobs.fit.device_peak", lambda config: next(plans))
    fitted = fit_to_device(load_config(overrides={"batch_size": 16, "micro_batch": 2}), "cuda")
    assert (fitted.stream, fitted.calibration.micro_batch) == ("on", 2)
