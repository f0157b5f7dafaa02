"""The generic adapter's teacher conditions on its prompts encoded once, up front, at one token length.

The generic teacher is the pipeline's own __call__, which encodes its prompts inside, through its encode_prompt.
Every teacher batch is known before the first runs (TextToImageAdapter.teacher_runs). Each batch's call is run up
to its first transformer call, keeping what encode_prompt returned; then the runs go, each with encode_prompt
handing back its batch's results in call order, so each batch is encoded once.

Two things come of encoding first:
- One token length for every batch. Pipelines that pad a batch's prompts to its longest (Qwen-Image) give each
  batch another length, and calibration minibatches mix the rows of every batch. Every batch's embeddings are
  padded to the longest with zeros and their mask with False: a pad token is masked, so the other tokens' outputs
  are the unpadded call's (up to float rounding). A batch whose mask the pipeline left out (all tokens valid) gets
  one of ones.
- Under torchrun rank 0 alone holds the text encoders. It encodes every batch of every process and sends the
  results. The other processes' pipelines hold text encoders built on the meta device (no weights:
  pipeline_runs.teacher_pipeline). A machine then holds one set of encoders (Qwen-Image's Qwen2.5-VL: 18 GiB as
  the teacher holds it), and every process conditions on what one process computes for the same batch, bit for bit.
A pipeline without encode_prompt encodes inside each call, as it would alone, in every process.
"""
import copy
import logging
from collections import deque

import torch

from vq4dit.models.adapters.pipeline_runs import FirstCallPerStep, map_tensors, until_transformer
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError

logger = logging.getLogger(__name__)


def replayable(pipeline_class):
    """Whether a pipeline class encodes its prompts through an encode_prompt method (what this module replays)."""
    return callable(getattr(pipeline_class, "encode_prompt", None))


def _prompt_of(args, kwargs):
    """The prompt argument of an encode_prompt call (its first), as recorded and checked on replay."""
    return kwargs["prompt"] if "prompt" in kwargs else (args[0] if args else None)


def record_encodings(pipe, model, runs):
    """Rank 0: for each (count, run) of `runs`, [(prompt, what encode_prompt returned, on the CPU)] of every
    encode_prompt call of that run, the run stopped at its first transformer call."""
    encode, calls = pipe.encode_prompt, []

    def recording(*args, **kwargs):
        prompt = copy.deepcopy(_prompt_of(args, kwargs))  # as given: Z-Image's encode_prompt edits its list in place
        out = encode(*args, **kwargs)
        calls.append((prompt, map_tensors(out, lambda t: t.detach().to("cpu", copy=True))))  # the run cannot edit it
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


def _items(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _tokens(items):
    """The token length of one encode_prompt result: dim 1 of its first (B, T, D) tensor (None: it has none)."""
    return next((t.shape[1] for t in items if torch.is_tensor(t) and t.dim() >= 3), None)


def _is_mask(t, tokens):
    return torch.is_tensor(t) and t.dim() == 2 and t.shape[1] == tokens and not t.is_floating_point()


def _pad(t, tokens, length):
    """(B, tokens, ...) token embeddings or a (B, tokens) mask, padded with zeros (False) to `length` tokens."""
    if (not torch.is_tensor(t) or t.dim() < 2 or t.shape[1] != tokens or length == tokens
            or (t.dim() == 2 and t.is_floating_point())):
        return t  # not a token tensor (pooled embeddings are (B, D), float)
    return torch.cat([t, t.new_zeros((t.shape[0], length - tokens, *t.shape[2:]))], dim=1)


def _mask_items(results, lengths, pipeline):
    """(positions of the attention mask among the items of one encode_prompt call's results, its dtype): where a
    batch has a (B, T) integer or bool tensor; else the one item every batch left out (None: Qwen-Image's mask when
    all its tokens are valid), as the tokenizer's int64."""
    found = [j for j in range(len(results[0])) if any(_is_mask(items[j], n) for items, n in zip(results, lengths))]
    if found:
        return found, next(items[j] for items in results for j in found if items[j] is not None).dtype
    absent = [j for j in range(len(results[0])) if all(items[j] is None for items in results)]
    if len(absent) != 1:
        raise UserError(f"{pipeline}: the teacher batches' prompts encode to {min(lengths)} to {max(lengths)} tokens "
                        "and its encode_prompt returns no attention mask to pad them to one length with; give "
                        "prompts (--prompts) that encode to one length")
    return absent, torch.long


def one_length(records, pipeline):
    """`records` (record_encodings) of a `pipeline` (its name, for errors) with the token tensors of each
    encode_prompt call padded to that call's longest over the batches, their masks False there (see the module
    docstring); a mask the pipeline left out is ones. The records themselves when every batch has one length."""
    padded = [list(calls) for calls in records]
    for c in range(len(records[0]) if records else 0):
        results = [_items(calls[c][1]) for calls in records]
        lengths = [_tokens(items) for items in results]
        if None in lengths or len(set(lengths)) == 1:
            continue
        masks, dtype = _mask_items(results, lengths, pipeline)
        for b, (items, tokens) in enumerate(zip(results, lengths)):
            rows = next(t.shape[0] for t in items if torch.is_tensor(t) and t.dim() >= 3)
            out = [_pad(torch.ones((rows, tokens), dtype=dtype) if j in masks and t is None else t, tokens,
                        max(lengths)) for j, t in enumerate(items)]
            prompt, result = records[b][c]
            padded[b][c] = (prompt, type(result)(out) if isinstance(result, (list, tuple)) else out[0])
        logger.info("encode_prompt call %d: the teacher batches' prompts are %d to %d tokens long, each padded to %d "
                    "(masked)", c, min(lengths), max(lengths), max(lengths))
    return padded


def replayed_runs(pipe, model, runs):
    """`runs` [(count, run)] of a teacher whose pipeline `pipe` holds `model`, each run with encode_prompt answering
    the (padded) records of that batch, recorded on rank 0 (see the module docstring). Under torchrun every rank must
    call this at once."""
    runs = list(runs)
    lead = distributed.rank() == 0
    records = distributed.broadcast_nested(one_length(record_encodings(pipe, model, runs), type(pipe).__name__) if lead
                                           else None, 0)
    if distributed.active():
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
        return map_tensors(out, lambda t: t.to(device))

    pipe.__dict__["encode_prompt"] = answer
    try:
        out = run()
    finally:
        pipe.__dict__.pop("encode_prompt")
    if calls:
        raise RuntimeError(f"{type(pipe).__name__}.encode_prompt called {len(calls)} times less than in rank 0's run")
    return out
