"""Which device a run uses: --device auto | cpu | cuda | cuda:N, checked against what this machine has."""
import torch

from utils.errors import UserError


def resolve_device(device):
    """'auto' -> cuda when present, else cpu; a CUDA device on a machine without one is a UserError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device
