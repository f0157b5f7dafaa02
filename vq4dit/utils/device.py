"""Which device a run uses: --device auto | cpu | cuda | cuda:N, checked against what this machine has."""
import os
import re

import torch

from vq4dit.utils.errors import UserError


def resolve_device(device, what="--device"):
    """'auto' -> cuda when present, else cpu; a CUDA device on a machine without one (or without that index) is a
    UserError naming `what` was given (a flag, or an API argument)."""
    device = str(device)  # a torch.device from the API
    check_device_name(device, what)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} {device}: CUDA is not available here; use cpu or auto")
    if device.startswith("cuda") and int(device[5:] or 0) >= torch.cuda.device_count():
        raise UserError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def check_device_name(device, what="--device"):
    """A UserError when `device` is none of the names resolve_device takes (whatever this machine has)."""
    if str(device) not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", str(device)):
        raise UserError(f"{what} {device}: use auto, cpu, cuda or cuda:N")


def physical_memory():
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device):
    """The memory of torch.device `device` in bytes: a CUDA device's own, else the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory()


def model_device(model):
    """The device `model` runs on: its first parameter's not on the CPU (a streamed model keeps its blocks on the host
    in their stored dtype, and the rest on the device: models/offload.py), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "cpu"), torch.device("cpu"))
