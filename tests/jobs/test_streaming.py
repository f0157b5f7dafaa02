"""--stream on: the same artifact as an unstreamed run, with the teacher on the host in its stored dtype (bf16 here)
and the student built block by block (jobs/streaming.py, models/offload.py). On the CPU the "device" is the host:
what is checked is the dtype each tensor is kept in, the moves and the bytes, not a second memory."""
from unittest import mock

import pytest
import torch

from tests.conftest import randomize
from tests.models.tiny_t2i import FAST, PROMPTS, flux_pipeline
from vq4dit.jobs.config import load_config
from vq4dit.jobs.fit import RESERVE_BYTES, fit_to_device
from vq4dit.jobs.quantize import quantize
from vq4dit.jobs.streaming import check_streamable
from vq4dit.models.loading import DiTSpec, save_dit
from vq4dit.utils.errors import UserError
from vq4dit.utils.host_memory import mapped_bytes

BUDGET = {"codebook_size": 16, "kmeans_iters": 2, "iters": 2, "calib_samples": 2, "calib_timesteps": 2, "steps": 2,
          "device": "cpu"}


@pytest.fixture
def bf16_dit(tmp_path):
    """A tiny DiT whose checkpoint stores bf16 weights (as Flux's does)."""
    model = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build())
    path = tmp_path / "bf16.safetensors"
    save_dit(model.to(torch.bfloat16), "DiT-Digits/2", path)
    return str(path)


def observed_run(overrides, out):
    """quantize with `overrides`: (model.safetensors bytes, [what the teacher held when recording started])."""
    import vq4dit.calib.teacher

    seen, record = [], vq4dit.calib.teacher.record_set

    def recorded(problem, *args, **kwargs):
        blocks = problem.teacher_blocks
        before = {t.dtype for b in blocks for t in b.parameters()}
        data = record(problem, *args, **kwargs)
        moves = problem.offload.moves if problem.offload is not None else None
        host = [t for b in blocks for t in b.parameters()]
        seen.append({"block_dtypes": before, "moves": moves, "blocks": len(blocks),
                     "mapped": (mapped_bytes(host), sum(t.nbytes for t in host)),
                     "after": {t.dtype for b in blocks for t in b.parameters()},
                     "student": {t.dtype for t in problem.student.parameters() if t.is_floating_point()}})
        return data

    with mock.patch.object(vq4dit.calib.teacher, "record_set", recorded):
        quantize(load_config(overrides=overrides), str(out), progress=False)
    return (out / "model.safetensors").read_bytes(), seen


@pytest.mark.parametrize("method", ["vq4dit", "kmeans"])
def test_streamed_dit_run_is_byte_identical_with_a_bf16_teacher_on_the_host(bf16_dit, tmp_path, method):
    """Mutations caught: the per-block build seeding layers by block (seed + i) or building a layer twice or not at
    all (artifact differs); the load upcasting to fp32 anyway (the teacher's blocks are fp32: no streaming); the
    teacher's blocks left on the device after their forward (dtype fp32 after recording); no moves counted."""
    budget = BUDGET if method == "vq4dit" else {k: BUDGET[k] for k in ("codebook_size", "kmeans_iters", "device")}
    common = {"ckpt": bf16_dit, "method": method, **budget}
    off, _ = observed_run({**common, "stream": "off"}, tmp_path / "off")
    on, seen = observed_run({**common, "stream": "on"}, tmp_path / "on")
    assert on == off
    if method == "vq4dit":
        (s,) = seen
        assert s["block_dtypes"] == s["after"] == {torch.bfloat16}
        assert s["student"] == {torch.float32}
        # every block moved in once per teacher call (one batch, a call per step) and once for the rerun that tells
        # the batched slots (calib.record.tell_batched)
        assert s["moves"] == s["blocks"] * (BUDGET["steps"] + 1)


@pytest.mark.parametrize("method", ["vq4dit", "kmeans"])
def test_a_streamed_bits_allocation_by_blocks_is_the_unstreamed_one(bf16_dit, tmp_path, method):
    """--bits 1 --bits-probe block: each block's noise probes run while it is resident (upcast to fp32), so the
    streamed allocation (every layer's weight error and sensitivity, to the bit) and the artifact are the
    unstreamed ones, for a method that keeps a teacher and one that fills the model itself. Mutations caught: the
    noise added to a block's bf16 host weights (not resident: another perturbation, other sensitivities); a block
    left on the host by a probe that stops the model at it (models.offload: torch sends it back although it never
    came in; the next call fails on bf16 weights). Blocks 1 and 4 quantized (the probes stop the model at each, the
    others stream through): 18 s for both methods, against 54 s for all six blocks, which catch the same."""
    import vq4dit.jobs.quantize

    budget = BUDGET if method == "vq4dit" else {k: BUDGET[k] for k in ("kmeans_iters", "device")}
    common = {"ckpt": bf16_dit, "method": method, **budget, "bits": 1.0, "bits_settings": "16x8,16x4,16x2",
              "bits_probe": "block", "include": r"^blocks\.[14]\."}
    common.pop("codebook_size", None)
    allocations, allocate = [], vq4dit.jobs.quantize.allocate
    with mock.patch.object(vq4dit.jobs.quantize, "allocate", lambda *a, **k: allocations.append(allocate(*a, **k))
                           or allocations[-1]):
        off, _ = observed_run({**common, "stream": "off"}, tmp_path / "off")
        on, _ = observed_run({**common, "stream": "on"}, tmp_path / "on")
    assert on == off
    assert allocations[0].layers == allocations[1].layers
    assert len(set(allocations[0].settings.values())) > 1  # an allocation, not one setting everywhere


def test_streamed_flux_pipeline_is_byte_identical(tmp_path):
    """The same through a diffusers pipeline stored in bf16 (from_pretrained in the stored dtype, the pipeline's
    .to(device) that must leave the blocks on the host, the non-block parts in fp32). Mutation caught: load_transformer
    ignoring stored_dtype's torch_dtype and keeping bf16 for the student (artifact differs) or upcasting the
    teacher (block dtypes fp32); the stored teacher copied on load (private memory in every process: mapped 0)."""
    pipe = flux_pipeline()
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(str(tmp_path / "pipeline"), safe_serialization=True)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = {**FAST, "ckpt": str(tmp_path / "pipeline"), "prompts": str(tmp_path / "prompts.txt"), "iters": 3}
    off, _ = observed_run({**common, "stream": "off"}, tmp_path / "off")
    on, seen = observed_run({**common, "stream": "on"}, tmp_path / "on")
    assert on == off
    assert seen[0]["block_dtypes"] == seen[0]["after"] == {torch.bfloat16} and seen[0]["moves"] > 0
    # the host teacher's blocks are the checkpoint's mapped pages (one copy per machine under torchrun), not copies
    mapped, total = seen[0]["mapped"]
    assert mapped == total > 0


def test_a_streamed_generic_pipeline_is_byte_identical(tmp_path):
    """Qwen-Image through the generic adapter, stored in bf16: the adapter finds its blocks by a probe that runs the
    pipeline, so the model streams from the load on (its candidate block lists under HostBlocks), and the student's
    skeleton, copied after, takes none of the teacher's hooks. Mutations caught: the probe run on the bf16 host
    model (dtype error: every generic pipeline failed with --stream on, and so under --stream auto on a small
    GPU); the skeleton copying the streaming hooks (the student's blocks call the teacher's HostBlocks)."""
    from tests.models.tiny_generic import BUILDERS, SIZES

    pipe = BUILDERS["qwenimage"]()
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(str(tmp_path / "pipeline"), safe_serialization=True)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = {**FAST, **SIZES["qwenimage"], "ckpt": str(tmp_path / "pipeline"),
              "prompts": str(tmp_path / "prompts.txt"), "iters": 3}
    off, _ = observed_run({**common, "stream": "off"}, tmp_path / "off")
    on, seen = observed_run({**common, "stream": "on"}, tmp_path / "on")
    assert on == off
    assert seen[0]["block_dtypes"] == {torch.bfloat16} and seen[0]["moves"] > 0


def test_stream_auto_is_off_on_the_cpu_and_on_refuses_what_it_cannot_stream(bf16_dit, monkeypatch):
    """Mutations caught: auto streaming on the CPU however small its memory (the default run would change its path);
    --stream on accepted with --bits --bits-probe model (a streamed pass of the whole model per Linear), or refused
    with --bits-probe block (which streams)."""
    monkeypatch.setattr("vq4dit.jobs.fit.device_memory", lambda device: 0)
    config = load_config(overrides={"ckpt": bf16_dit, "device": "cpu"})
    assert fit_to_device(config, "cpu") == config
    with pytest.raises(UserError, match="--stream on: --bits with --bits-probe model probes each Linear"):
        check_streamable(load_config(overrides={"ckpt": bf16_dit, "stream": "on", "bits": 2.0}))
    check_streamable(load_config(overrides={"ckpt": bf16_dit, "stream": "on", "bits": 2.0, "bits_probe": "block"}))


def test_stream_is_written_only_when_given_and_is_no_part_of_the_run_key(bf16_dit):
    """Mutations caught: config.yaml gaining a stream line in the default run (every default artifact's bytes
    change); a run streamed on refusing to resume one streamed off (stream in the run key)."""
    from vq4dit.jobs.runkey import RunKey

    default, on = load_config(overrides={"ckpt": bf16_dit}), load_config(overrides={"ckpt": bf16_dit, "stream": "on"})
    assert "stream" not in default.to_dict() and on.to_dict()["stream"] == "on"
    assert RunKey.of(default) == RunKey.of(on)


def test_stream_auto_on_a_cuda_device_follows_the_unstreamed_plan(bf16_dit, monkeypatch):
    """auto streams exactly when the unstreamed plan's device peak exceeds the device's memory (a fake CUDA device
    here), and runs unstreamed where there is no plan. Mutations caught: the comparison inverted or made >=; the
    streamed plan compared (the config's own stream); a plan error ending the run."""
    from vq4dit.jobs.memory_plan import plan_for

    config = load_config(overrides={"ckpt": bf16_dit})
    plan, asked = plan_for(config), []
    need = plan.peaks.device_peak.device_bytes
    monkeypatch.setattr("vq4dit.jobs.memory_plan.plan_for", lambda config: asked.append(config.stream) or plan)
    for room, streams in ((need, False), (need - 1, True)):
        monkeypatch.setattr("vq4dit.jobs.fit.device_memory", lambda device, room=room: room + RESERVE_BYTES)
        asked.clear()
        assert fit_to_device(config, "cuda").stream == ("on" if streams else "off")
        assert asked[0] == "off"

    def no_plan(config):
        raise UserError("no plan here")

    monkeypatch.setattr("vq4dit.jobs.memory_plan.plan_for", no_plan)
    assert fit_to_device(config, "cuda").stream == "off"
