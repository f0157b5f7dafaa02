"""The generic adapter (models/adapters/generic.py): blocks by structure in call order, the probe, two-call
guidance, the teacher's text encoders, its errors."""
import gc
import re

import pytest
import torch
from torch import nn

from tests.models.tiny_generic import BUILDERS, SIZES
from vq4dit.models.adapters import TeacherPlan
from vq4dit.models.adapters.base import linear_pattern
from vq4dit.models.adapters.generic import GenericAdapter
from vq4dit.models.adapters.load import load_model
from vq4dit.models.adapters.pipeline_runs import FirstCallPerStep
from vq4dit.utils.errors import UserError

pytest.importorskip("transformers")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.to_out = nn.ModuleList([nn.Linear(4, 4)])  # a list inside a block is no block list
        self.ff = nn.Linear(4, 4)

    def forward(self, h):
        return h + self.ff(self.to_out[0](self.attn(h)))


class Toy(nn.Module):
    """Lists declared in another order than called: `late` first, `early` called first; `unused` never called;
    `embed` holds single Linears (an embedder, not blocks)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.late = nn.ModuleList([Block(), Block()])
        self.early = nn.ModuleList([Block(), Block()])
        self.unused = nn.ModuleList([Block()])
        self.proj_out = nn.Linear(4, 4)

    def forward(self, hidden_states, timestep):
        h = self.embed[1](self.embed[0](hidden_states))
        for block in [*self.early, *self.late]:
            h = block(h)
        return self.proj_out(h)


class ToyPipeline:
    """Calls its transformer once per step, and once more for the negative prompt when guidance_scale > 1 (as Wan,
    Chroma and Qwen-Image do)."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, prompt, guidance_scale, num_inference_steps, generator, output_type, height=None):
        for step in range(num_inference_steps):
            t = torch.full((len(prompt),), 1000.0 - step)
            x = torch.randn(len(prompt), 3, 4, generator=generator[0])
            self.transformer(hidden_states=x, timestep=t)
            if guidance_scale > 1:
                self.transformer(hidden_states=x, timestep=t)


def toy_adapter():
    model, adapter = Toy().eval(), GenericAdapter()
    adapter.source, adapter.pipe = "toy", ToyPipeline(None)  # the probe's pipeline, without loading one
    return model, adapter


def test_blocks_are_the_block_lists_in_call_order_and_their_linears_are_quantized():
    """Mutations caught: blocks in declaration order (late before early); uncalled blocks kept; the embedder's list
    of single Linears or a block's inner list taken as blocks; a Linear outside the blocks selected."""
    model, adapter = toy_adapter()
    assert [name for name, _ in adapter.blocks(model)] == ["early.0", "early.1", "late.0", "late.1"]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    pattern = re.compile(adapter.quant_include(model))
    expected = [n for n in linears if n.startswith(("early.", "late."))]
    assert [n for n in linears if pattern.search(n)] == expected and len(expected) == 12
    excluded = re.compile(linear_pattern(adapter.quant_include(model), exclude=r"\.ff$"))
    assert [n for n in linears if excluded.search(n)] == [n for n in expected if not n.endswith(".ff")]


def test_the_probe_sees_one_call_per_step_when_guidance_calls_twice():
    """FirstCallPerStep passes the negative prompt's call (same timestep) around the hooks. Mutation caught: every
    call through the module (2 calls per step reach the recording)."""
    model, adapter = toy_adapter()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[0]),
                                             with_kwargs=True)
    adapter.blocks(model)  # probes at guidance 1
    for cfg in (1.0, 4.0):
        probe = adapter.probe(model, cfg)
        assert (probe.rows, probe.calls_per_step) == (1, 1)
    handle.remove()
    assert seen == [1] * 4  # two probes of two steps
    proxy = FirstCallPerStep(model)
    assert proxy.training is model.training and proxy.proj_out is model.proj_out  # the module's attributes


def test_a_model_without_block_lists_is_a_one_line_error():
    model, adapter = toy_adapter()
    del model.late, model.early, model.unused
    with pytest.raises(UserError) as error:
        adapter.blocks(model)
    assert "\n" not in str(error.value)
    assert "no transformer blocks found" in str(error.value)
    assert "embed (ModuleList of 2 Linear), proj_out (Linear)" in str(error.value)


def test_num_frames_is_refused_by_an_image_pipeline(tmp_path):
    BUILDERS["qwenimage"]().save_pretrained(str(tmp_path / "qwenimage"))
    base = load_model(None, str(tmp_path / "qwenimage"))
    base.adapter.bind(base.extra, num_frames=5, **SIZES["qwenimage"])
    with pytest.raises(UserError, match="num_frames=5: QwenImagePipeline draws images, not videos"):
        base.adapter.blocks(base.model)


def test_a_size_for_a_pipeline_that_takes_none_is_refused():
    """sample.py --height with a pipeline whose __call__ has no height failed at the first draw, after the model
    loaded (mutation: only num_frames checked against the signature)."""
    class Fixed:
        def __call__(self, prompt, num_inference_steps=1):
            pass

    with pytest.raises(UserError, match="^height=8: Fixed takes no size; drop it$"):
        GenericAdapter().size_options(Fixed(), 8, None, None)
    assert GenericAdapter().size_options(Fixed(), None, None, None) == {}


def text_encoders():
    from transformers import PreTrainedModel

    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]


def test_wan_teacher_records_one_call_per_step_and_releases_its_text_encoder(tmp_path):
    """Wan guides with two transformer calls per step: the recording's hooks see the first (the prompt's) only,
    with one row per trajectory; its UMT5 encoder is gone once the teacher's runs are consumed. Mutation caught:
    the teacher pipeline kept after the runs."""
    BUILDERS["wan"]().save_pretrained(str(tmp_path / "wan"))
    base = load_model(None, str(tmp_path / "wan"))
    adapter, before = base.adapter, text_encoders()
    adapter.bind(base.extra, prompts=["a cat", "a dog"], **SIZES["wan"])
    blocks = adapter.blocks(base.model)
    plan = TeacherPlan(num_samples=3, steps=2, cfg_scale=3.0, seed=0, batch_size=2)
    assert adapter.rows_per_trajectory(plan) == 1
    recorded, all_calls = [], []
    hooks = [base.model.register_forward_pre_hook(lambda m, a, k: recorded.append(k["hidden_states"].shape[0]),
                                                  with_kwargs=True),
             blocks[0][1].register_forward_pre_hook(lambda m, a: all_calls.append(1))]
    with torch.no_grad():
        counts = [count for count, run in adapter.teacher_runs(base.model, plan, "cpu") if run() is None]
    for hook in hooks:
        hook.remove()
    assert counts == [2, 1] and recorded == [2, 2, 1, 1]
    assert len(all_calls) == 2 * len(recorded)  # the negative prompt's calls ran, unseen
    assert adapter.pipe is None
    assert [type(o).__name__ for o in text_encoders() if not any(o is b for b in before)] == []


# --- under torchrun: rank 0 alone holds the text encoders -------------------------------------------------------

def _teacher_calls(directory, family, owned):
    """[(batch, kwargs of each recorded transformer call)] of the generic teacher's runs of the tiny `family` pipeline
    at `directory`, for the batches `owned(b)` (the others are skipped, as a rank skips another rank's share), and the
    teacher pipeline's text encoder: (its calls, whether it holds weights)."""
    base = load_model(None, directory)
    adapter = base.adapter
    adapter.bind(base.extra, prompts=["a cat", "a dog", "a red car"], **SIZES[family])
    adapter.blocks(base.model)
    encoder, encodes = adapter.pipeline(base.model).text_encoder, []
    encoder.register_forward_pre_hook(lambda m, a: encodes.append(1))
    holds = not any(p.is_meta for p in encoder.parameters())
    calls, batch = [], [None]
    base.model.register_forward_pre_hook(lambda m, a, k: calls.append((batch[0], {n: v.clone() for n, v in k.items()
                                                                                  if torch.is_tensor(v)})),
                                         with_kwargs=True)
    plan = TeacherPlan(num_samples=4, steps=2, cfg_scale=3.0, seed=0, batch_size=1)
    with torch.no_grad():
        for b, (_, run) in enumerate(adapter.teacher_runs(base.model, plan, "cpu")):
            batch[0] = b
            if owned(b):
                run()
    return [(b, kwargs) for b, kwargs in calls if b is not None], len(encodes), holds  # None: the probe's


def _replay_worker(rank, port, directory, out):
    import os

    from vq4dit.utils import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.init("cpu")
    calls, encodes, holds = _teacher_calls(directory, "qwenimage", lambda b: b % 2 == rank)
    torch.save({"calls": calls, "encodes": encodes, "holds": holds}, f"{out}/rank{rank}.pt")
    distributed.shutdown()


def test_under_torchrun_rank_0_alone_encodes_the_generic_teachers_prompts(tmp_path):
    """Two gloo processes run the Qwen-Image teacher, each its own batches: rank 1's text encoder holds no weights and
    never runs (rank 0 probes for it), rank 0 encodes every batch once (as one process does: the probe at the
    teacher's guidance, then 4 batches; the count starts after the first probe), and every
    transformer call of either rank equals one process's call of that batch, bit for bit. Catches the encoders loaded
    in every process, a rank conditioning on the stand-in's zeros, rank 0 encoding its own batches twice, and a
    batch given another batch's embeddings."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    directory = str(tmp_path / "qwenimage")
    BUILDERS["qwenimage"]().save_pretrained(directory)
    mp.spawn(_replay_worker, args=(free_port(), directory, str(tmp_path)), nprocs=2)
    single, encodes, _ = _teacher_calls(directory, "qwenimage", lambda b: True)
    assert encodes == 1 + 4
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["holds"] for r in ranks] == [True, False]
    assert [r["encodes"] for r in ranks] == [1 + 4, 0]
    want = {}
    for b, kwargs in single:
        want.setdefault(b, []).append(kwargs)
    for r, result in enumerate(ranks):
        got = {}
        for b, kwargs in result["calls"]:
            got.setdefault(b, []).append(kwargs)
        assert sorted(got) == [b for b in range(4) if b % 2 == r]
        for b, seen in got.items():
            assert len(seen) == len(want[b]) == 2  # one call per step
            for kwargs, reference in zip(seen, want[b]):
                assert sorted(kwargs) == sorted(reference)
                for name, value in reference.items():
                    assert torch.equal(kwargs[name], value), (r, b, name)
