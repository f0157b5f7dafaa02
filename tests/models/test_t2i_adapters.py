"""Text-to-image adapters (PixArt, SD3, Flux): which Linears are quantized, the zero-data teacher, prompts."""
import gc
import json
import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import hub_bars_switchable
from tests.models.tiny_t2i import BUILDERS, save_tiny_t2i_pipeline
from vq4dit.models.adapters import TeacherPlan, adapter_for
from vq4dit.models.adapters.base import linear_pattern
from vq4dit.models.adapters.load import load_model
from vq4dit.models.prompts import BUILTIN_PROMPTS, prompt_list, read_prompts
from vq4dit.utils.errors import UserError

pytest.importorskip("transformers")
FAMILIES = ["pixart", "sd3", "flux"]

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
ADDED = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
FF = ["ff.net.0.proj", "ff.net.2"]
FF_CONTEXT = ["ff_context.net.0.proj", "ff_context.net.2"]
ADALN = ["norm1.linear", "norm1_context.linear"]
# every Linear inside each block of the tiny models, written out by hand from diffusers' block definitions
EXPECTED = {
    "pixart": [f"transformer_blocks.{i}.{n}" for i in range(2) for n in
               [a.replace("attn.", "attn1.") for a in ATTN] + [a.replace("attn.", "attn2.") for a in ATTN] + FF],
    "sd3": [f"transformer_blocks.0.{n}" for n in  # block 0 has SD3.5's second self-attention (attn2)
            ADALN + ATTN + ADDED + ["attn.to_add_out"] + [a.replace("attn.", "attn2.") for a in ATTN] + FF
            + FF_CONTEXT]
    + [f"transformer_blocks.1.{n}" for n in ADALN + ATTN + ADDED + FF],  # the last block updates the image only
    "flux": [f"transformer_blocks.{i}.{n}" for i in range(2) for n in
             ADALN + ATTN + ADDED + ["attn.to_add_out"] + FF + FF_CONTEXT]
    + [f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in
       ["norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]],
}
# and every Linear outside the blocks: embedders, the shared adaLN-single, the final projection
FULL_PRECISION = {
    "pixart": ["adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
               "adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"],
    "sd3": ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
            "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "context_embedder",
            "norm_out.linear", "proj_out"],
    "flux": ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
             "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
             "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "context_embedder",
             "x_embedder", "norm_out.linear", "proj_out"],
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    for family in FAMILIES:
        save_tiny_t2i_pipeline(family, root / family)
    return root


def all_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_inside_the_blocks_is_quantized_and_nothing_else(family):
    model = BUILDERS[family]().transformer
    adapter = adapter_for(model)
    assert sorted(adapter.linears(model)) == sorted(EXPECTED[family])
    assert sorted(set(all_linears(model)) - set(EXPECTED[family])) == sorted(FULL_PRECISION[family])


def test_flux_blocks_are_dual_then_single_in_call_order():
    model = BUILDERS["flux"]().transformer
    names = [name for name, _ in adapter_for(model).blocks(model)]
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]


@pytest.mark.parametrize("include,exclude", [
    (None, None), (None, r"\.ff(_context)?\."), (r"^single_transformer_blocks\.", None),
    (r"attn\.to_[qkv]$", r"^transformer_blocks\.1\."), (r"x_embedder|proj_out", None)])
def test_include_and_exclude_select_linears_by_name(include, exclude):
    """One regex does what filtering the names by hand does: included (default: the adapter's rule), not excluded."""
    model = BUILDERS["flux"]().transformer
    adapter = adapter_for(model)
    pattern = re.compile(linear_pattern(adapter.quant_include(model), include, exclude))
    expected = [n for n in all_linears(model) if (re.search(include, n) if include else n in EXPECTED["flux"])
                and not (exclude and re.search(exclude, n))]
    assert [n for n in all_linears(model) if pattern.search(n)] == expected


def text_encoders():
    """Every transformers model object alive in the process."""
    from transformers import PreTrainedModel

    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]


@pytest.mark.parametrize("family,cfg", [("pixart", 3.0), ("sd3", 1.0), ("flux", 3.5)])
def test_teacher_calls_once_per_step_with_the_rows_it_announces_and_no_text_encoder(pipelines, family, cfg):
    """Each trajectory batch calls the transformer once per sampler step with trajectories x rows_per_trajectory
    rows (Flux: guidance is an input, the batch is not doubled), and the text encoders are gone before it starts."""
    base = load_model(None, str(pipelines / family))
    adapter = base.adapter
    adapter.bind(base.extra, prompts=["a cat", "a dog", "a red car"], height=8, width=8)
    plan = TeacherPlan(num_samples=3, steps=2, cfg_scale=cfg, seed=0, batch_size=2)
    calls, before = [], text_encoders()  # held here: objects other tests left behind are not the teacher's

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        new = [type(o).__name__ for o in text_encoders() if not any(o is b for b in before)] if not calls else []
        calls.append((hidden.shape[0], new))

    handle, batches = base.model.register_forward_pre_hook(hook, with_kwargs=True), []
    with torch.no_grad():
        for count, run in adapter.teacher_runs(base.model, plan, "cpu"):
            run()
            batches.append(count)
    handle.remove()
    assert batches == [2, 1]
    assert [rows for rows, _ in calls] == [b * adapter.rows_per_trajectory(plan) for b in batches for _ in range(2)]
    assert adapter.rows_per_trajectory(plan) == {"pixart": 2, "sd3": 1, "flux": 1}[family]
    assert calls[0][1] == [], f"text encoders alive during the teacher: {calls[0][1]}"


def test_a_trajectory_does_not_depend_on_its_batch(pipelines):
    """Noise from one generator per trajectory: trajectory 1's first transformer input is the same in batches of 2
    and of 1."""
    base = load_model(None, str(pipelines / "sd3"))
    base.adapter.bind(base.extra, height=8, width=8)
    firsts = []
    hook = base.model.register_forward_pre_hook(lambda m, a, k: firsts.append(k["hidden_states"].clone()),
                                                with_kwargs=True)
    for batch in (2, 1):
        base.adapter.teacher_batch = batch
        plan = TeacherPlan(num_samples=2, steps=1, cfg_scale=1.0, seed=3, batch_size=batch)
        with torch.no_grad():
            for _, run in base.adapter.teacher_runs(base.model, plan, "cpu"):
                run()
    hook.remove()
    torch.testing.assert_close(firsts[0][1], firsts[2][0], rtol=0, atol=0)
    assert not torch.equal(firsts[0][0], firsts[0][1])


def test_conditions_cycle_the_prompts(caplog):
    """Without prompts the built-in ones are drawn, and the log says so: samples.npz keeps only their indices
    (mutation: no log line -> the user cannot tell which prompts made the images)."""
    import logging

    model = BUILDERS["pixart"]().transformer
    adapter = adapter_for(model)
    prompts, labels = adapter.conditions(model, 5, seed=0, prompts=["a", "b"])
    assert prompts == ["a", "b", "a", "b", "a"] and labels.tolist() == [0, 1, 0, 1, 0]
    assert labels.dtype == np.int64
    with caplog.at_level(logging.INFO, logger="vq4dit.models.adapters.t2i"):
        prompts, _ = adapter.conditions(model, 2, seed=0)
    assert prompts == list(BUILTIN_PROMPTS[:2])
    assert any(f"the built-in prompts ({len(BUILTIN_PROMPTS)} ImageNet class names" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(UserError, match="text-to-image model: give prompts"):
        adapter.conditions(model, 2, seed=0, classes=[1, 2])


def test_prompt_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a cat \n\n a dog\n")
    assert read_prompts(path) == ["a cat", "a dog"]
    path.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        read_prompts(path)
    with pytest.raises(UserError, match="cannot read prompts file"):
        read_prompts(tmp_path / "missing.txt")
    assert prompt_list(None) == list(BUILTIN_PROMPTS) and len(set(BUILTIN_PROMPTS)) == 100
    with pytest.raises(UserError, match="non-empty strings"):
        prompt_list(["a", " "])


def test_class_conditional_adapters_refuse_prompts(tiny_dit):
    """The API's bind names what it refuses (mutation: the old message, naming none of them)."""
    model, _ = tiny_dit
    with pytest.raises(UserError, match="^prompts: not used with a dit model, class-conditional"):
        adapter_for(model).bind({}, prompts=["a cat"])
    with pytest.raises(UserError, match="^height, num_frames: not used with a dit model"):
        adapter_for(model).bind({}, height=64, num_frames=8)


def test_an_unsupported_transformer_names_the_supported_classes(pipelines, tmp_path):
    """Any diffusers model class loads (the generic adapter takes those without a dedicated one); a class this
    diffusers does not have, or another library's, is refused by name."""
    shutil.copytree(pipelines / "pixart", tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    for entry in (["diffusers", "NoSuchTransformer2DModel"], ["transformers", "T5EncoderModel"]):
        index["transformer"] = entry
        (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(UserError, match=f"transformer is {entry[0]}.{entry[1]}; supported: diffusers model "
                                            "classes"):
            load_model(None, str(tmp_path / "p"))


def test_the_legacy_transformer_class_of_released_pixart_pipelines_loads(pipelines, tmp_path):
    """PixArt-alpha/* pipelines name diffusers' legacy Transformer2DModel; its norm_type makes it a PixArt model."""
    shutil.copytree(pipelines / "pixart", tmp_path / "p")
    for path, key in ((tmp_path / "p" / "model_index.json", "transformer"),
                      (tmp_path / "p" / "transformer" / "config.json", "_class_name")):
        content = json.loads(path.read_text())
        content[key] = ["diffusers", "Transformer2DModel"] if key == "transformer" else "Transformer2DModel"
        path.write_text(json.dumps(content))
    base = load_model(None, str(tmp_path / "p"))
    assert type(base.model).__name__ == "PixArtTransformer2DModel" and base.adapter.family == "pixart"


def test_image_size_must_fit_the_vae_and_the_tokens(pipelines):
    base = load_model(None, str(pipelines / "flux"))
    assert base.adapter.image_size(base.model, 1, 8, 12) == (8, 12)
    assert base.adapter.image_size(base.model, 8) == (1024, 1024)  # FluxPipeline's default through an 8x VAE
    with pytest.raises(UserError, match="width=9 is not a multiple of 2"):
        base.adapter.image_size(base.model, 1, 8, 9)
    with pytest.raises(UserError, match="height=1000 is not a multiple of 16"):
        base.adapter.image_size(base.model, 8, 1000)


def _encode_worker(rank, port, directory, out):
    import os

    import vq4dit.models.adapters.t2i as t2i
    from vq4dit.utils import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.init("cpu")
    loads, load = [], t2i.load_pipeline
    t2i.load_pipeline = lambda *a, **k: loads.append(a) or load(*a, **k)
    adapter = adapter_for(BUILDERS["flux"]().transformer)
    positive, negative = adapter._encode_once(directory, list(PROMPTS_2P))
    torch.save({"positive": positive, "negative": negative, "loads": len(loads)}, f"{out}/rank{rank}.pt")
    distributed.shutdown()


PROMPTS_2P = ("a photo of a cat", "a red car", "a tree under the sky")


def test_under_torchrun_rank_0_alone_loads_the_text_encoders_and_every_rank_gets_its_embeddings(tmp_path):
    """Two gloo processes encode the teacher's prompts: rank 0 loads the text encoders, rank 1 none, and both hold
    the embeddings one process computes, bit for bit. Catches every rank loading the encoders (a machine holding one
    T5-XXL per process), and embeddings lost or reshaped on the way (names, shapes, dtypes)."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    directory = tmp_path / "flux"
    save_tiny_t2i_pipeline("flux", directory)
    mp.spawn(_encode_worker, args=(free_port(), str(directory), str(tmp_path)), nprocs=2)
    single = adapter_for(BUILDERS["flux"]().transformer)._encode_once(str(directory), list(PROMPTS_2P))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["loads"] for r in results] == [1, 0]
    assert single[0]  # Flux's guidance is distilled: no negative embeddings
    for r in results:
        for got, want in zip((r["positive"], r["negative"]), single):
            assert sorted(got) == sorted(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_sampling_through_a_pipeline_of_another_transformer_class_is_refused(tmp_path):
    """sample.py --quantized SD3_ART --pipeline FLUX_DIR was a traceback deep in the pipeline (AttributeError
    'guidance_embeds'); now load_pipeline compares the transformer it is given with the directory's own and says
    which is which, before loading anything (mutation: the check left out -> another error, or a traceback)."""
    from vq4dit.models.pipelines import load_pipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(UserError, match=rf"^{tmp_path}: its transformer is a FluxTransformer2DModel, this model a "
                                        r"Linear; give the pipeline the model came from"):
        load_pipeline(tmp_path, "cpu", transformer=nn.Linear(2, 2))


@pytest.mark.parametrize("source", ["moved", "owner/name"])
def test_a_recorded_pipeline_that_is_gone_says_to_pass_pipeline(source, tmp_path, offline_cache):
    """Sampling an artifact whose recorded pipeline moved (a directory) or cannot be fetched (a hub id, offline)
    named the path only; now it says the path is the artifact's record and to pass --pipeline DIR, and a
    --pipeline given by hand gets no such hint. Mutation: the hint left out (the first message, as it was)."""
    from vq4dit.models.adapters.base import SampleSettings

    adapter = adapter_for(BUILDERS["flux"]().transformer)
    source = str(tmp_path / source) if source == "moved" else source
    extra = {"pipeline": {"source": source}}
    hint = r"[^.]; pass --pipeline DIR \(the pipeline the artifact came from"
    with pytest.raises(UserError, match=rf"^{source}[: ].*{hint}"):
        adapter.image_sampler(None, extra, SampleSettings(), "cpu")
    with pytest.raises(UserError) as given:
        adapter.image_sampler(None, extra, SampleSettings(pipeline=source), "cpu")
    assert "--pipeline" not in str(given.value)


def test_a_named_vae_without_its_config_is_an_incomplete_pipeline(tmp_path):
    """A pipeline directory whose vae/ folder is gone fell back to a VAE factor of 8, and the run then blamed
    --height (mutation: the fallback kept for a VAE model_index.json names); a VAE config of another layout
    (Qwen-Image's) or no VAE at all still gives 8."""
    from vq4dit.models.adapters.t2i import vae_scale_factor

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match=r"model_index.json names a vae, but .*vae/config.json cannot be read"):
        vae_scale_factor(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    assert vae_scale_factor(tmp_path) == 8
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2]}))
    assert vae_scale_factor(tmp_path) == 2
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"base_dim": 96}))
    assert vae_scale_factor(tmp_path) == 8
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": [None, None]}))
    (tmp_path / "vae" / "config.json").unlink()
    assert vae_scale_factor(tmp_path) == 8


def test_a_pipeline_class_that_is_not_the_transformers_is_one_line(tmp_path):
    """model_index.json naming FluxPipeline over SD3's components was a TypeError traceback from encode_prompt
    (prompt_3); now one line naming the pipeline class and the transformer's family (mutation: TypeError not
    caught)."""
    pipe = save_tiny_t2i_pipeline("sd3", tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"its FluxPipeline does not encode prompts as the sd3 transformer's "
                                        r"pipeline does \(.*prompt_3.*\); model_index.json's _class_name"):
        adapter_for(pipe.transformer)._encode_once(tmp_path, ["a cat"])


def test_a_pipeline_saved_without_its_transformer_or_a_subclass_is_not_refused(tmp_path):
    """pipe.transformer = None; pipe.save_pretrained(DIR) (what the project's own save_pretrained message advises)
    writes "transformer": [null, null], and a subclass or torch.compile'd model is its class: none is refused
    (mutations: the check without the null entry -> 'has no transformer component'; by exact class name)."""
    import diffusers

    from vq4dit.models.pipelines import check_transformer

    index = {"_class_name": "FluxPipeline", "transformer": [None, None]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    check_transformer(tmp_path, nn.Linear(2, 2))
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers",
                                                                                   "FluxTransformer2DModel"]}))
    subclass = type("MyFlux", (diffusers.FluxTransformer2DModel,), {})
    model = subclass.__new__(subclass)
    check_transformer(tmp_path, model)
    compiled = nn.Module()
    compiled._orig_mod = model
    check_transformer(tmp_path, compiled)
    with pytest.raises(UserError, match="its transformer is a FluxTransformer2DModel, this model a Linear"):
        check_transformer(tmp_path, nn.Linear(2, 2))


@hub_bars_switchable
def test_loading_bars_follow_the_hubs_switch_and_leave_it_off():
    """models.pipelines.loading_bars: with huggingface_hub's bars off (-q), diffusers' and transformers' loading
    bars are off inside and restored after, and the hub's stay off (transformers' enable_progress_bar turns them on).
    With the hub's on, nothing changes. Mutations: the restore leaving the hub's bars on (later downloads show
    bars under -q); the libraries' bars not turned off."""
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tl
    from diffusers.utils import logging as dl

    from vq4dit.models.pipelines import loading_bars

    with loading_bars():
        assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled()
    hub.disable_progress_bars()
    try:
        with loading_bars():
            assert not dl.is_progress_bar_enabled() and not tl.is_progress_bar_enabled()
        assert dl.is_progress_bar_enabled() and tl.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
    finally:
        hub.enable_progress_bars()
