"""Under torchrun, the generic adapter's teacher encodes its prompts on rank 0 alone.

The generic teacher is the pipeline's own __call__, which encodes its prompts inside, through its encode_prompt.
Every rank knows every teacher batch (the runs of TextToImageAdapter.teacher_runs; each rank runs its own share).
Rank 0 runs each batch's call up to its first transformer call, keeping what encode_prompt returned, and sends
these to every rank. The other ranks' pipelines hold text encoders built on the meta device (no weights:
pipeline_runs.teacher_pipeline), and during a batch's run encode_prompt hands back rank 0's results for that
batch in call order, rank 0's own included, so each batch is encoded once. A machine then holds one set of text
encoders (Qwen-Image's Qwen2.5-VL in fp32 is 33 GB), and every rank conditions on what one process computes for the
same batch, bit for bit. A pipeline without encode_prompt keeps its encoders in every process.
"""
import logging
from collections import deque

import torch

from vq4dit.models.adapters.pipeline_runs import FirstCallPerStep, until_transformer
from vq4dit.utils import distributed

logger = logging.getLogger(__name__)


def replayable(pipeline_class):
    """Whether a pipeline class encodes its prompts through an encode_prompt method (what this module replays)."""
    return callable(getattr(pipeline_class, "encode_prompt", None))


def _prompt_of(args, kwargs):
    """The prompt argument of an encode_prompt call (its first), as recorded and checked on replay."""
    return kwargs["prompt"] if "prompt" in kwargs else (args[0] if args else None)


def _on(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    return type(value)(_on(v, device) for v in value) if isinstance(value, (list, tuple)) else value


def record_encodings(pipe, model, runs):
    """Rank 0: for each (count, run) of `runs`, [(prompt, what encode_prompt returned, on the CPU)] of every
    encode_prompt call of that run, the run stopped at its first transformer call."""
    encode, calls = pipe.encode_prompt, []

    def recording(*args, **kwargs):
        out = encode(*args, **kwargs)
        calls.append((_prompt_of(args, kwargs), _on(out, "cpu")))
        return out

    records = []
    pipe.__dict__["encode_prompt"] = recording  # an instance attribute: the class's method stays as it is
    try:
        for _, run in runs:
            calls = []
            until_transformer(model, run)
            records.append(calls)
    finally:
        pipe.__dict__.pop("encode_prompt")
        if isinstance(pipe.transformer, FirstCallPerStep):
            pipe.transformer.timestep = None  # the stopped call's first step must reach the recording again
    return records


def replayed_runs(pipe, model, runs):
    """`runs` [(count, run)] of a teacher whose pipeline `pipe` holds `model`, each run with encode_prompt answering
    rank 0's records of that batch (see the module docstring). Every rank must call this at once."""
    runs = list(runs)
    records = distributed.broadcast_nested(record_encodings(pipe, model, runs) if distributed.rank() == 0 else None,
                                           0)
    logger.info("rank 0 encoded the prompts of %d teacher batches for all %d processes", len(runs),
                distributed.size())
    for (count, run), calls in zip(runs, records):
        yield count, (lambda run=run, calls=calls: _replay(pipe, run, deque(calls)))


def _replay(pipe, run, calls):
    """run() with pipe.encode_prompt answering `calls` (deque of (prompt, result)) in order."""
    device = pipe._execution_device

    def answer(*args, **kwargs):
        if not calls:
            raise RuntimeError(f"{type(pipe).__name__}.encode_prompt called more often than in rank 0's run")
        prompt, out = calls.popleft()
        if prompt != _prompt_of(args, kwargs):
            raise RuntimeError(f"{type(pipe).__name__}.encode_prompt called with {_prompt_of(args, kwargs)!r} where "
                               f"rank 0's run had {prompt!r}")
        return _on(out, device)

    pipe.__dict__["encode_prompt"] = answer
    try:
        out = run()
    finally:
        pipe.__dict__.pop("encode_prompt")
    if calls:
        raise RuntimeError(f"{type(pipe).__name__}.encode_prompt called {len(calls)} times less than in rank 0's run")
    return out
