"""Shared test fixtures: tiny DiTs with non-trivial (non-zero adaLN) weights."""
import os
import socket

import pytest
import torch

from vq4dit.models.loading import DiTSpec


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # results must not depend on the thread count, and the suite shares the CPU with other jobs: with two threads
    # on a busy 2-core machine, small ops wait on each other (a tiny k-means took 1.25 s instead of 0.035 s);
    # session-wide, so module- and session-scoped fixtures run on one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# tests of huggingface_hub's progress-bar switch: an environment that fixes it (HF_HUB_DISABLE_PROGRESS_BARS, read
# when the hub is imported) leaves nothing to switch
hub_bars_switchable = pytest.mark.skipif(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None,
                                         reason="HF_HUB_DISABLE_PROGRESS_BARS fixes the hub's progress bars")


def randomize(model, seed=0, std=0.05):
    """Overwrite every trainable parameter with seeded noise so zero-initialised layers do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@pytest.fixture
def tiny_dit():
    """DiT-Digits/2 architecture on 8x8 one-channel inputs, 10 classes, random weights."""
    spec = DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1)
    return randomize(spec.build()), spec


@pytest.fixture
def tiny_latent_dit():
    """DiT-Digits/2 architecture on 4-channel 8x8 latents (64 px images), 10 classes, random weights."""
    spec = DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=4)
    return randomize(spec.build(), seed=1), spec


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache under tmp_path, offline (HF_HUB_OFFLINE=1): nothing may reach the network."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def sample_dit(model, out_dir, num_samples, classes=None, **settings):
    """jobs.sample.sample_to_dir for an in-memory project DiT on the CPU, progress bars off."""
    from vq4dit.jobs.sample import Loaded, Request, sample_to_dir
    from vq4dit.models.adapters import adapter_for
    from vq4dit.models.adapters.base import SampleSettings

    return sample_to_dir(Loaded(model, adapter_for(model), {}), str(out_dir), Request(num_samples, classes),
                         SampleSettings(**{"progress": False, **settings}), "cpu")


def free_port():
    """A TCP port free on 127.0.0.1 now (the rendezvous of a test's gloo processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
