"""What a calibration works on: the student (quantized in place), its full-precision teacher, the quantized layers,
and the method's hook that makes layers trainable. Every calibration mode takes one of these."""
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class Problem:
    """student, teacher: the quantized model and its FP copy (same qualified names); adapter: their
    models.adapters.Adapter (blocks, teacher runs); layers: {qualified name: quantized layer} of the student;
    prepare(layers, fp_weights): the method's hook, called on a group of layers when calibration reaches them
    (jobs/methods.py: VQ4DiT softens them); seed: the random streams of minibatch orders and label dropout;
    needs_moments: whether prepare wants the layers' input moments (a third argument {name: (in, in) E[x x^T]}),
    which the block-wise walk measures on each block's inputs (calib/moments.py)."""

    student: nn.Module
    teacher: nn.Module
    adapter: object
    layers: dict
    prepare: Callable = lambda layers, fp_weights, moments=None: None
    seed: int = 0
    progress: bool = True
    needs_moments: bool = False
    blocks: list = field(init=False)  # [(name, student block)] in call order
    fp_weights: dict = field(init=False)  # {layer name: (out, in) FP weight}

    def __post_init__(self):
        self.blocks = self.adapter.blocks(self.student)
        self.fp_weights = {name: self.teacher.get_submodule(name).weight.detach() for name in self.layers}

    @property
    def device(self):
        return next(self.student.parameters()).device

    @property
    def teacher_blocks(self):
        return [self.teacher.get_submodule(name) for name, _ in self.blocks]

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
