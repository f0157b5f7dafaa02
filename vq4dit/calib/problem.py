"""What a calibration works on: the student (quantized in place), its full-precision teacher, the quantized layers,
and the method's hook that makes layers trainable. Every calibration mode takes one of these."""
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class Problem:
    """student, teacher: the quantized model and its FP copy (same qualified names); adapter: their
    models.adapters.Adapter (blocks, teacher runs); layers: {qualified name: quantized layer} of the student;
    prepare(layers, fp_weights): the method's hook, called on a group of layers when calibration reaches them
    (jobs/methods.py: VQ4DiT softens them); seed: the random streams of minibatch orders and label dropout;
    needs_moments: whether prepare wants the layers' input moments (a third argument {name: (in, in) E[x x^T]}),
    which the block-wise walk measures on each block's inputs (calib/moments.py); offload: the
    models.offload.HostBlocks that streams the teacher's blocks to the device (None: the teacher is on the device)."""

    student: nn.Module
    teacher: nn.Module
    adapter: object
    layers: dict
    prepare: Callable = lambda layers, fp_weights, moments=None: None
    seed: int = 0
    progress: bool = True
    needs_moments: bool = False
    offload: object = None
    blocks: list = field(init=False)  # [(name, student block)] in call order
    fp_weights: Mapping = field(init=False)  # {layer name: (out, in) FP weight}

    def __post_init__(self):
        self.blocks = self.adapter.blocks(self.student)
        self.fp_weights = FPWeights(self.teacher, list(self.layers), self.device)

    @property
    def device(self):
        return next(self.student.parameters()).device

    @property
    def teacher_blocks(self):
        return [self.teacher.get_submodule(name) for name, _ in self.blocks]

    def teacher_block(self, name):
        """Context: the teacher's block `name`, on the device for the whole context (streamed: moved in and upcast
        on entry, back to the host on exit)."""
        block = self.teacher.get_submodule(name)
        return self.offload.resident(block) if self.offload is not None else contextlib.nullcontext(block)

    def layers_of(self, block_name):
        """The quantized layers inside the block named `block_name`, in order."""
        return layers_of(self.layers, block_name)

    def layers_through(self, i):
        """The quantized layers of blocks 0..i."""
        return {n: layer for name, _ in self.blocks[:i + 1] for n, layer in self.layers_of(name).items()}

    def prepare_layers(self, layers, moments=None):
        self.prepare(layers, self.fp_weights, moments)


def layers_of(by_name, block_name):
    """The entries of {layer name: value} that belong to the block named `block_name`, in order."""
    prefix = f"{block_name}."
    return {name: value for name, value in by_name.items() if name.startswith(prefix)}


class FPWeights(Mapping):
    """{layer name: its teacher's (out, in) weight, detached, fp32 on `device`}, read when asked: the resident copy
    while a streamed teacher block is on the device (else an upcast copy); a teacher on the device gives its own
    tensors."""

    def __init__(self, teacher, names, device):
        self.teacher, self.names, self.device = teacher, names, device

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.teacher.get_submodule(name).weight.detach().to(self.device, torch.float32)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)
