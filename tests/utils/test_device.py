import pytest
import torch

from vq4dit.utils.device import model_device, resolve_device
from vq4dit.utils.errors import UserError


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "cuda:-1", "cudax", "CPU", " cpu", "cuda:1:2", ""])
def test_malformed_devices_name_the_forms(device):
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_a_cuda_index_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_a_streamed_model_runs_on_the_device_its_host_blocks_are_not_on():
    """A streamed model's first parameters may be a block's, kept on the host; the run's device is that of the parts
    that are not ("meta" stands for a GPU here). Catches the first parameter's device taken (the pipeline would run
    on the CPU beside a model on the GPU)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    assert model_device(model) == torch.device("meta")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
