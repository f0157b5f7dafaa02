"""The memory plan (shape arithmetic on the meta device) against what a real quantize run records, holds and writes
(tiny pipelines, tests/models/tiny_t2i.py), and on the published configs of the real models."""
import functools
import json
import math
import struct

import pytest
import torch

from tests.models.tiny_t2i import quantized_run
from vq4dit.calib.problem import layers_of
from vq4dit.jobs.config import load_config
from vq4dit.jobs.memory_plan import Planned, dry_run_plan, memory_plan
from vq4dit.jobs.methods import method_for
from vq4dit.jobs.plan_sources import meta_dit, meta_model, plan_source
from vq4dit.models.adapters import ADAPTERS
from vq4dit.models.adapters.load import load_model
from vq4dit.vq import CodebookSpec, quantize_linears

pytest.importorskip("transformers")
FAMILIES = ["pixart", "sd3", "flux"]


PLANS = {}


@pytest.fixture(params=FAMILIES)
def run(request, tmp_path_factory):
    """The family's quantize run (shared with tests/jobs/test_quantize_t2i.py) and the plan of its config."""
    r = quantized_run(request.param, tmp_path_factory.getbasetemp() / "t2i_runs")
    if request.param not in PLANS:
        name, config, factor, directory = plan_source(str(r.pipeline))
        adapter = ADAPTERS[name]()
        PLANS[request.param] = memory_plan(Planned(meta_model(name, config), adapter, factor,
                                                   adapter.prompt_tokens(directory)), r.config)
    return r, PLANS[request.param]


def test_the_plan_predicts_every_recorded_slot(run):
    r, plan = run
    recorded = r.calibration_set.slots
    assert [key for key, _, _ in plan.slots] == list(recorded)
    for key, shape, nbytes in plan.slots:
        assert tuple(shape) == tuple(recorded[key].shape), key
        assert nbytes == recorded[key].numel() * recorded[key].element_size(), key
    assert plan.cache_bytes == sum(t.numel() * t.element_size() for t in recorded.values())


def test_the_plan_predicts_what_the_block_walk_holds_at_each_block(run):
    """The ActivationStore counts the batched tensors it allocates; constant slots (Flux's rotary table) are
    plain copies, counted by the plan only."""
    r, plan = run
    cset = r.calibration_set
    constants = sum(t.numel() * t.element_size() for k, t in cset.slots.items() if not cset.batched[k])
    assert r.store_peaks == [b - constants for b in plan.walk_blocks]


def test_the_plan_predicts_the_artifact_and_its_bits(run):
    r, plan = run
    raw = (r.artifact / "model.safetensors").read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert plan.artifact_bytes == len(raw) - 8 - header  # the tensors' bytes, to the byte
    quant = json.loads((r.artifact / "quant_config.json").read_text())
    assert plan.layers == len(quant["layers"])
    assert plan.bits == math.log2(r.config.codebooks.k) / r.config.codebooks.dim


def test_the_plan_predicts_teacher_and_soft_student_bytes(run):
    r, plan = run
    base = load_model(None, str(r.pipeline))
    model = base.model

    def held(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    assert plan.teacher_bytes == held(model)
    c = r.config.codebooks
    fp_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qlayers = quantize_linears(model, CodebookSpec(c.k, c.dim, c.candidates, kmeans_iters=1),
                               include=base.adapter.quant_include(model), seed=r.config.seed, progress=False,
                               soft=False)
    peak = held(model)  # block-wise: the job keeps layers hard, calibration softens one block's at a time
    method = method_for(r.config.method, c)
    for name, _ in base.adapter.blocks(model):
        layers = layers_of(qlayers, name)
        method.prepare(layers, fp_weights)
        peak = max(peak, held(model))
        for layer in layers.values():
            layer.harden()
    assert plan.student_bytes == peak


def test_flux_dev_plan_has_no_cfg_rows_and_every_block_linear():
    config = load_config("flux_dev_w2")
    name, model_config, factor, _ = plan_source(config.model.ckpt)
    plan = memory_plan(Planned(meta_model(name, model_config), ADAPTERS[name](), factor, ADAPTERS[name].text_tokens),
                       config)
    points = config.teacher.calib_samples * config.teacher.calib_timesteps
    assert plan.points.endswith(f"= {points} points")  # guidance distilled
    assert plan.layers == 19 * 14 + 38 * 6 and plan.bits == 2.0
    assert 11.8e9 < plan.weights < 11.9e9  # FLUX.1-dev: 12B parameters, nearly all in the blocks
    assert plan.pass_bytes == 0 and "end-to-end pass" not in plan.format()


def test_the_end_to_end_pass_holds_every_blocks_training_at_once():
    """With e2e_iters, the plan adds the pass: the sum of the blocks' training bytes (57 blocks for Flux-dev: far
    above one block's), named on its own line. Catches the pass counted as one block."""
    config = load_config("flux_dev_w2", overrides={"e2e_iters": 10})
    name, model_config, factor, _ = plan_source(config.model.ckpt)
    plan = memory_plan(Planned(meta_model(name, model_config), ADAPTERS[name](), factor, ADAPTERS[name].text_tokens),
                       config)
    assert 19 * plan.block_bytes < plan.pass_bytes <= 57 * plan.block_bytes
    assert "end-to-end pass" in plan.format()
    assert [tuple(shape) for key, shape, _ in plan.slots[:2]] == [(448, 4096, 3072), (448, 512, 3072)]


def test_dry_run_plans_a_pipeline_and_the_embedded_dit_but_not_rtn(tmp_path_factory):
    r = quantized_run("flux", tmp_path_factory.getbasetemp() / "t2i_runs")
    text = dry_run_plan(load_config(overrides={"ckpt": str(r.pipeline), "height": 8, "width": 8}))
    assert text.startswith("memory plan: FluxTransformer2DModel (4 blocks) at 8x8")
    assert dry_run_plan(load_config(overrides={"ckpt": None})).startswith("memory plan: DiT (6 blocks) at 16x16")
    assert dry_run_plan(load_config(overrides={"ckpt": None, "method": "rtn"})) is None


@functools.cache
def flux_dev_plan():
    """(the meta model, the MemoryPlan) of flux_dev_w2 on CUDA, unstreamed, the process's own bytes left out."""
    config = load_config("flux_dev_w2", overrides={"device": "cuda"})
    name, model_config, factor, _ = plan_source(config.model.ckpt)
    model = meta_model(name, model_config)
    return model, memory_plan(Planned(model, ADAPTERS[name](), factor, ADAPTERS[name].text_tokens), config, runtime=0)


def test_flux_dev_stages_hold_the_transients_and_the_evaluation_chunk_fits_its_budget(tmp_path):
    """Catches the build counted without the teacher copy (it holds the fp32 model twice: the largest device peak of
    Flux-dev, above the walk the old plan named), the record stage counting the resident models only or the block
    outputs the recorder no longer keeps (57 of them: 30 GiB more), and evaluation passes at the old 256 rows (about
    250 GiB over the resident models; the 6 GiB budget gives 7 rows). The JSON holds each stage and the overall
    peaks."""
    from vq4dit.calib.chunks import EVAL_BUDGET

    _, plan = flux_dev_plan()
    stages = {s.name.split(" (")[0]: s for s in plan.peaks.stages}
    resident = plan.teacher_bytes + plan.hard_bytes
    build = stages["build quantized layers"].device_bytes
    assert 2 * plan.teacher_bytes < build < 2 * plan.teacher_bytes + plan.hard_bytes
    assert plan.peaks.device_peak.name.startswith("build")
    assert 2**30 < stages["record"].device_bytes - resident < 10 * 2**30  # one block's forward at the teacher's batch
    evaluation = stages["evaluation passes"].device_bytes - resident - plan.student_bytes + plan.hard_bytes
    assert 2**30 < evaluation < 1.1 * EVAL_BUDGET  # the chunk, plus one decoded weight
    path = tmp_path / "plan.json"
    plan.peaks.write_json(path, plan.title)
    saved = json.loads(path.read_text())
    assert saved["device_peak_bytes"] == max(s["device_bytes"] for s in saved["stages"])
    assert [s["name"] for s in saved["stages"]] == [s.name for s in plan.peaks.stages]
    assert saved["device"] == "cuda" and saved["host_peak_stage"] == plan.peaks.host_peak.name


def test_flux_dev_streamed_plan_holds_one_fp32_block_and_the_bf16_teacher_on_the_host():
    """--stream on: the walk's block i holds the unstreamed stage less the fp32 teacher's blocks plus block i and
    the largest block in bf16 (the next one's copies, staged ahead on a GPU; not on a CPU), and the host holds the
    teacher in bf16 at every stage but save. Catches streamed stages that leave out the block on the device or keep
    the whole teacher there, a host teacher counted in fp32, and the staged block left out (or counted in fp32)."""
    import dataclasses

    from vq4dit.jobs.plan_stages import stages

    model, off = flux_dev_plan()
    on = stages(dataclasses.replace(off.inputs, stream=True), "cuda", 0)
    blocks = ADAPTERS[type(model).__name__]().blocks(model)
    fp_blocks = [sum(p.numel() * 4 for p in block.parameters()) for _, block in blocks]
    walk = {s.name: s.device_bytes for s in off.peaks.stages if s.name.startswith("walk")}
    streamed = {s.name: s.device_bytes for s in on.stages if s.name.startswith("walk")}
    staged = max(sum(p.numel() * 2 for p in block.parameters()) for _, block in blocks)
    assert [streamed[n] - walk[n] for n in walk] == [f - sum(fp_blocks) + staged for f in fp_blocks]
    on_cpu = {s.name: s.device_bytes for s in stages(dataclasses.replace(off.inputs, stream=True), "cpu", 0).stages}
    assert [on_cpu[n] - streamed[n] for n in walk] == [-staged] * len(walk)
    assert off.stored_bytes == sum(p.numel() * 2 for p in model.parameters()) and not off.stream
    assert all(s.host_bytes >= off.stored_bytes for s in on.stages[:-1])
    assert on.device_peak.device_bytes < 40 * 2**30 < off.peaks.device_peak.device_bytes


def one_and_two_processes(monkeypatch, **overrides):
    """(the embedded model's plan in one process, its plan in each of 2 processes on one machine, the 2 processes'
    TeacherShares) of a config with `overrides`."""
    from vq4dit.calib.teacher import TeacherShare, teacher_plan
    from vq4dit.jobs.plan_sources import dit_source
    from vq4dit.models.adapters.dit import DiTAdapter

    config = load_config(overrides={"ckpt": None, "calib_timesteps": 2, "steps": 4, **overrides})
    model, factor = dit_source(config.model)

    def plan():
        return memory_plan(Planned(meta_dit(model), DiTAdapter(), factor), config, runtime=0)

    one = plan()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return one, plan(), [TeacherShare.of(teacher_plan(config.teacher, config.seed), 2, 2, r, 2) for r in range(2)]


def test_under_torchrun_the_plan_is_one_process_share_and_the_machine_holds_each_process(monkeypatch):
    """Each of 2 processes records only its trajectories: the slots hold the largest share's rows (5 trajectories:
    one process records 3 of them, not 2.5), and the host line counts both processes. Mutations: the plan ignoring
    WORLD_SIZE (every figure the single process's), or rows halved (the smaller share) -> fail."""
    one, two, teacher_shares = one_and_two_processes(monkeypatch, calib_samples=5)
    shares = [len(share.rows) for share in teacher_shares]
    assert sorted(shares) == [8, 12]  # 2 and 3 trajectories x 2 kept steps x 2 (CFG)
    for (key, shape, _), (key_two, shape_two, _) in zip(one.slots, two.slots):
        assert key == key_two and shape[0] == 20 and shape_two[0] == max(shares), key
    assert two.cache_bytes * 20 == one.cache_bytes * max(shares)
    host = two.peaks.host_peak
    assert (f"this machine's host memory: {2 * host.host_bytes / 2**30:.2f} GiB at {host.name} = 2 processes x "
            f"{host.host_bytes / 2**30:.2f} GiB each") in two.format()
    assert "processes" not in one.format().split("\n")[-1]


def test_under_torchrun_the_end_pass_points_are_those_the_process_holds(monkeypatch):
    """800 calibration points, an end-to-end pass over 256 of them: one process holds all 256, each of 2 processes
    the ones among its rows, as EndPoints.take picks them from its share; the plan's pass data is the largest
    process's. Catches the plan counting 256 points in every process (twice what each holds)."""
    from vq4dit.calib.capture import CalibrationSet
    from vq4dit.calib.endpass import EndPoints

    one, two, shares = one_and_two_processes(monkeypatch, calib_samples=200, e2e_iters=10)
    held = [len(EndPoints.take(CalibrationSet([], {"x": torch.zeros(len(s.rows), 1)}, {"x": True}, len(s.rows),
                                              s.shard())).rows) for s in shares]
    assert sum(held) == 256 and max(held) < 256
    per_row = [one.cache_bytes / 800, two.cache_bytes / max(len(s.rows) for s in shares)]
    assert one.inputs.end_points == pytest.approx(2 * per_row[0] * 256, abs=2)
    assert two.inputs.end_points == pytest.approx(2 * per_row[1] * max(held), abs=2)


@pytest.mark.parametrize("dtypes", ["bf16", "bf16+fp32"])
def test_under_torchrun_a_machine_holds_the_mapped_teacher_and_the_text_encoders_once(dtypes, tmp_path, monkeypatch):
    """2 processes on one machine, a streamed Flux pipeline. Its files store bf16 only: each process's host teacher
    is the files' mapped pages (tests/jobs/test_streaming.py checks that a run's are), which the machine holds
    once; and rank 0 alone encodes the prompts, so while it holds the text encoders the other process holds the
    rest. Its files store two dtypes: the load converts them, and each process holds its own copy. Catches the
    teacher counted once per process although mapped (or once although converted), and the text encoders counted
    in every process."""
    from tests.models.tiny_t2i import flux_pipeline
    from vq4dit.jobs.memory_plan import plan_for

    pipe = flux_pipeline()
    pipe.transformer.to(torch.bfloat16)
    if dtypes == "bf16+fp32":
        pipe.transformer.proj_out.to(torch.float32)
    pipe.save_pretrained(str(tmp_path / "flux"), safe_serialization=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = plan_for(load_config(overrides={"ckpt": str(tmp_path / "flux"), "height": 8, "width": 8, "stream": "on",
                                           "device": "cpu"}))
    peaks, x = plan.peaks, plan.inputs
    mapped = x.stored if dtypes == "bf16" else 0
    assert plan.stream and x.stored > 0 and x.text_encoders > 0
    encode = next(s for s in peaks.stages if s.name.startswith("encode prompts"))
    assert peaks.machine_host(encode) == encode.host_bytes + (encode.host_bytes - x.text_encoders) - mapped
    for stage in peaks.stages[:-1]:  # every stage but save holds the host teacher
        if stage is not encode:
            assert peaks.machine_host(stage) == 2 * stage.host_bytes - mapped, stage.name
    saved = peaks.to_json(plan.title)
    assert saved["machine_host_peak_bytes"] == max(peaks.machine_host(s) for s in peaks.stages)


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_the_plans_text_encoders_are_what_the_teacher_holds_and_under_torchrun_rank_0_alone_holds_them(family, tmp_path,
                                                                                                   monkeypatch):
    """Text encoders stored in bf16. Flux's adapter encodes with them as loaded (bf16); the generic adapter's teacher
    pipeline (Qwen-Image) computes in fp32 one layer at a time (the parts outside its layers upcast, each layer's fp32
    copy while it runs, measured here by a hook on every layer): the plan counts the bytes the job holds at most,
    and under torchrun once per machine (rank 0 encodes for every process: Flux before the teacher, Qwen-Image
    through its encode_prompt). Catches the generic teacher's encoders planned as stored (no fp32 parts) or upcast
    whole, and the generic adapter's encoders counted in every process."""
    from tests.models.tiny_generic import BUILDERS as GENERIC
    from tests.models.tiny_generic import SIZES
    from tests.models.tiny_t2i import flux_pipeline
    from vq4dit.jobs.memory_plan import plan_for
    from vq4dit.models.adapters.load import load_model
    from vq4dit.models.adapters.pipeline_runs import layer_lists, teacher_pipeline
    from vq4dit.models.pipelines import load_pipeline

    pipe = flux_pipeline() if family == "flux" else GENERIC[family]()
    for name, component in pipe.components.items():
        if name.startswith("text_encoder"):
            component.to(torch.bfloat16)
    directory = str(tmp_path / family)
    pipe.save_pretrained(directory, safe_serialization=True)
    if family == "flux":
        held = load_pipeline(directory, "cpu", transformer=None, vae=None)
    else:
        held = teacher_pipeline(directory, load_model(None, directory).model)
    encoders = [c for name, c in held.components.items() if name.startswith("text_encoder")]
    held_bytes = sum(t.numel() * t.element_size() for c in encoders for t in [*c.parameters(), *c.buffers()])
    running = [0]  # the largest fp32 copy of a layer while it runs (its bf16 weights stay held meanwhile)
    for _, layer in layer_lists(encoders[0]) if family != "flux" else []:
        layer.register_forward_pre_hook(lambda m, a: running.append(sum(p.nbytes for p in m.parameters())))
    with torch.no_grad():
        held.encode_prompt(["a cat"], device="cpu")
    held_bytes += max(running)
    size = {"height": 8, "width": 8} if family == "flux" else SIZES[family]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = plan_for(load_config(overrides={"ckpt": directory, **size, "device": "cpu"}))
    assert plan.inputs.text_encoders == held_bytes > 0
    encode = next(s for s in plan.peaks.stages if s.name.startswith("encode prompts"))
    assert plan.peaks.machine_host(encode) == 2 * encode.host_bytes - held_bytes


def test_blocks_of_one_shape_are_measured_once_with_what_each_gives_alone(tmp_path):
    """The plan measures a block's training and evaluation bytes once per distinct block (block_key); every block's
    figures equal those measured block by block. The tiny Flux pipeline with block 1's feed-forward left unquantized:
    catches a key that leaves out the quantized layers (block 1 would get block 0's figures)."""
    from unittest import mock

    import vq4dit.jobs.memory_plan as memory_plan_module
    from tests.models.tiny_t2i import save_tiny_t2i_pipeline
    from vq4dit.jobs.memory_plan import plan_for

    save_tiny_t2i_pipeline("flux", tmp_path / "pipeline")
    config = load_config(overrides={"ckpt": str(tmp_path / "pipeline"), "height": 8, "width": 8, "device": "cpu",
                                    "exclude": r"transformer_blocks\.1\.ff\."})
    calls, measure = [], memory_plan_module.block_training_bytes

    def counted(*args, **kwargs):
        calls.append(args[0])
        return measure(*args, **kwargs)

    with mock.patch.object(memory_plan_module, "block_training_bytes", counted):
        once = plan_for(config).inputs
    measured = len(calls)
    with mock.patch.object(memory_plan_module, "block_key", lambda *args: object()):  # every block its own key
        alone = plan_for(config).inputs
    assert len(once.train) == 4 and measured == 3  # double blocks 0 and 1 differ; the two single blocks are alike
    assert once.train == alone.train and once.evaluate == alone.evaluate
    assert once.train[0] != once.train[1]


def test_a_dit_preset_without_its_checkpoint_plans_that_dit_not_the_embedded_one():
    """`--config dit_xl_256_w2 --dry-run` (no --ckpt yet: a user checking whether DiT-XL/2 fits) printed the plan of
    the embedded 6-block digits model, 0.10 GiB (mutation: the embedded file's spec taken whatever the model)."""
    assert dry_run_plan(load_config("dit_xl_256_w2")).startswith("memory plan: DiT (28 blocks) at 256x256")
    assert dry_run_plan(load_config(None)).startswith("memory plan: DiT (6 blocks) at 16x16, W2 (k 256, d 4), ")


def test_a_bits_plan_says_it_sizes_the_layers_as_the_uniform_quantizer():
    """--bits 1.5 --dry-run titled its plan "W2 (k 256, d 4)" under a 1.5-bit budget (mutation: the title of the
    uniform run whatever --bits)."""
    title = dry_run_plan(load_config(overrides={"bits": 1.5})).splitlines()[0]
    assert ", --bits 1.5 (per-layer settings chosen at run time; layers and artifact sized here as W2 (k 256, d 4)" \
        in title


def test_blocks_without_a_quantized_layer_plan_no_update():
    """`--include '^blocks\\.[01]\\.' --dry-run` (quantize two blocks; the walk still passes the other four, without an
    update) raised "optimizer got an empty parameter list" from the plan's training probe of block 2, and on a GPU
    --stream auto then went without a plan (not streaming, whatever the model's size). Now such a block plans no
    update in the walk (what the end-to-end pass holds through it: test_memory_plan_vs_runs), and the selected
    blocks plan what they plan when every block is selected (mutation: the probe's optimizer built without
    parameters -> the ValueError)."""
    from vq4dit.jobs.memory_plan import plan_for

    every = plan_for(load_config(overrides={"device": "cpu"})).inputs
    two = plan_for(load_config(overrides={"device": "cpu", "include": r"^blocks\.[01]\."})).inputs
    assert two.train[:2] == every.train[:2] and min(every.train) > 0
    assert two.train[2:] == [0, 0, 0, 0]
