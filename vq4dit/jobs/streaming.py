"""Streaming a quantize run through the device block by block (--stream), for models whose fp32 teacher and student
do not fit the device together.

Streamed, the loaded model stays on the host in its stored dtype and becomes the teacher (models/offload.py: each
block visits the device in fp32 while it runs); the student is a copy of its module tree whose tensors start on the
meta device, filled block by block: block i's tensors are upcast onto the device and its Linears replaced by the
method's quantized layers at once (each FP Linear freed as its replacement is built), so the build holds one block in
fp32 beside the quantized layers so far, never a whole copy. A method that does not calibrate needs no teacher: its
model itself is filled (each block's host tensors go as it moves). Every value is the one an fp32 load gives and each
layer's k-means seed depends on its name only (vq.apply.layer_seed), so the artifact is byte-identical to an
unstreamed run's.
"""
import copy
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.models.offload import HostBlocks, upcast
from vq4dit.utils.errors import UserError
from vq4dit.utils.host_memory import mapped_bytes

logger = logging.getLogger(__name__)


def check_streamable(config):
    """UserError for what a streamed run does not do."""
    if config.codebooks.bits is not None and config.codebooks.bits_probe != "block":
        raise UserError(f"--stream {config.stream}: --bits with --bits-probe {config.codebooks.bits_probe} probes "
                        "each Linear with a pass of the whole model; streamed, use --bits-probe block (one pass per "
                        "block), or --stream off")


def within(include, prefix):
    """A regex selecting what `include` selects (re.search semantics) among the names under `prefix`."""
    return rf"^(?={re.escape(prefix)}\.)(?=.*?(?:{include}))"


def skeleton(model):
    """A copy of `model`'s module tree whose parameters and buffers are empty tensors on the meta device."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def fill_(target, source, device, recurse=True):
    """Every parameter and buffer of module `target` (its children too when `recurse`) set to `source`'s tensor of
    the same name (source may be target itself), upcast onto `device`."""
    values = {**dict(source.named_parameters(recurse=recurse)), **dict(source.named_buffers(recurse=recurse))}
    for name, t in [*target.named_parameters(recurse=recurse), *target.named_buffers(recurse=recurse)]:
        owner_name, _, attr = name.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        value = upcast(values[name], device)
        if value is values[name] and target is not source:  # already on the device in fp32: the student's own copy
            value = value.clone()
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=t.requires_grad)
        else:
            owner._buffers[attr] = value


def selected(model, pattern):
    regex = re.compile(pattern)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]


@dataclass
class StreamedModel:
    """Host model `model` streamed through the device by `offload` (models.offload.HostBlocks: runnable as the FP
    model, each block upcast onto the device while it runs), and the `student` to build: a skeleton whose parts
    outside the blocks are on the device already (`model` itself when no teacher is kept)."""

    model: nn.Module
    adapter: object
    student: nn.Module
    offload: HostBlocks

    @classmethod
    def open(cls, model, adapter, offload, keep_teacher):
        """`offload` streams `model` (jobs.quantize.load sets it up, over adapter.stream_blocks)."""
        blocks = adapter.blocks(model)
        with offload.paused():  # the skeleton takes none of the teacher's streaming hooks along
            student = skeleton(model) if keep_teacher else model
        inside = {id(m) for _, block in blocks for m in block.modules()}
        for name, module in model.named_modules():  # the parts outside the blocks: embedders, final layer
            if id(module) not in inside:
                fill_(student.get_submodule(name), module, offload.device, recurse=False)
        return cls(model, adapter, student, offload)

    def build(self, include, method, seed, settings=None, progress=True):
        """(student on the device, teacher (the host model; None when the method does not calibrate), the HostBlocks
        streaming the teacher or None, {name: quantized layer}): the Linears matching `include` built block by
        block by Method `method` (settings: a --bits allocation's {name: Setting}; see the module's docstring)."""
        model, student, device = self.model, self.student, self.offload.device
        if not method.calibrated:  # the model itself is filled: its blocks stream no more
            self.offload.close()
        blocks = self.adapter.blocks(model)
        outside = [n for n in selected(student, include) if not n.startswith(tuple(f"{b}." for b, _ in blocks))]
        layers = {}
        if outside:
            layers.update(method.build(student, rf"^(?:{'|'.join(map(re.escape, outside))})$", seed, progress,
                                       settings))
        for name, block in blocks:
            fill_(student.get_submodule(name), block, device)
            if selected(student, within(include, name)):
                layers.update(method.build(student, within(include, name), seed, False, settings))
        order = [n for n, _ in student.named_modules() if n in layers]
        layers = {n: layers[n] for n in order}
        if not method.calibrated:
            return student, None, None, layers
        host = [t for _, block in blocks for t in [*block.parameters(), *block.buffers()]]
        logger.info("the teacher's blocks on the host: %.2f GiB, of which %.2f GiB are its checkpoint files' mapped "
                    "pages (held once per machine, whatever the processes)", sum(t.nbytes for t in host) / 2**30,
                    mapped_bytes(host) / 2**30)
        return student, model, self.offload, layers
