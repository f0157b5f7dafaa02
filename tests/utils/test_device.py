import pytest
import torch

from vq4dit.utils.device import resolve_device
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
