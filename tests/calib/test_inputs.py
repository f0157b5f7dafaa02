import pytest
import torch

from calib.inputs import CALIB_STREAM, cache_bytes, calib_steps, embed_inputs, run_block, teacher_inputs, to_cache
from models.diffusion import make_diffusion
from models.sampler import PerSampleNoise, class_labels, sample_seed
from tests.calib.conftest import tiny_dit


@pytest.mark.parametrize("steps,count", [(50, 25), (50, 1), (7, 7), (10, 3), (250, 25)])
def test_calib_steps_evenly_spaced_distinct(steps, count):
    kept = calib_steps(steps, count)
    assert len(kept) == count and len(set(kept)) == count
    assert kept == sorted(kept, reverse=True) and all(0 <= i < steps for i in kept)
    if count > 1:  # both ends of the trajectory, gaps differ by at most one step
        assert kept[0] == steps - 1 and kept[-1] == 0
        gaps = [a - b for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_calib_steps_rejects_more_than_steps():
    with pytest.raises(ValueError):
        calib_steps(5, 6)


def test_teacher_inputs_are_the_sampler_inputs():
    model = tiny_dit()
    steps, kept, n = 6, 3, 5
    x, t, y = teacher_inputs(model, n, kept, steps, cfg_scale=1.5, seed=3, device="cpu", batch_size=2)
    assert x.shape == (n * kept * 2, 1, 8, 8) and t.shape == y.shape == (n * kept * 2,)
    # batches of 2, 2, 1 samples; inside a batch: step, then [cond; uncond] halves
    stream = sample_seed(3, CALIB_STREAM)
    labels = class_labels(stream, n, 10)
    timesteps = make_diffusion(steps).timestep_map
    first = torch.stack([PerSampleNoise(stream, [i], (1, 8, 8), "cpu")()[0] for i in range(n)])
    offset = 0
    for start, size in ((0, 2), (2, 2), (4, 1)):
        for j, i in enumerate(calib_steps(steps, kept)):
            rows = slice(offset + j * 2 * size, offset + (j + 1) * 2 * size)
            assert (t[rows] == int(timesteps[i])).all()
            assert torch.equal(y[rows], torch.cat([labels[start:start + size], torch.full((size,), 10)]))
            cond, uncond = x[rows].chunk(2)
            assert torch.equal(cond, uncond)  # CFG doubles the same latent
            if i == steps - 1:  # the first step sees the initial per-sample noise
                assert torch.equal(cond, first[start:start + size])
        offset += kept * 2 * size


def test_teacher_inputs_deterministic_for_a_seed():
    model = tiny_dit()
    a = teacher_inputs(model, 2, 2, 4, 1.5, seed=0, device="cpu")
    b = teacher_inputs(model, 2, 2, 4, 1.5, seed=0, device="cpu")
    c = teacher_inputs(model, 2, 2, 4, 1.5, seed=1, device="cpu")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_embed_and_run_block_match_the_model():
    model = tiny_dit()
    x, t, y = torch.randn(7, 1, 8, 8), torch.randint(0, 1000, (7,)), torch.randint(0, 11, (7,))
    tokens, c = embed_inputs(model, x, t, y, "cpu", batch_size=3)
    ref_tokens, ref_c = model.embed(x, t, y)
    assert tokens.dtype == torch.float16 and c.dtype == torch.float32
    torch.testing.assert_close(tokens.float(), ref_tokens, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(c, ref_c.detach())
    out = run_block(model.blocks[0], tokens, c, "cpu", batch_size=2)
    ref = model.blocks[0](tokens.float(), c)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=1e-3)
    run_block(model.blocks[0], tokens, c, "cpu", batch_size=2, out=tokens)  # in place: same values
    assert torch.equal(tokens, out)


def test_cache_bytes_dit_xl_defaults():
    # 32 trajectories x 2 (CFG) x 25 steps, T = 256 tokens, D = 1152, fp16: 900 MiB per activation tensor
    assert cache_bytes(32 * 2 * 25, 256, 1152) == 900 * 2**20


def test_block_outputs_beyond_fp16_stop_the_run():
    block = torch.nn.Identity()
    tokens = torch.full((3, 2, 4), 1000.0)
    run_block(lambda h, c: block(h) * 100, tokens.float(), torch.zeros(3, 4), "cpu")  # fp32 cache: fine
    with pytest.raises(FloatingPointError, match="exceed the torch.float16 range.*max \\|x\\| = 1e\\+05"):
        run_block(lambda h, c: block(h) * 100, tokens.half(), torch.zeros(3, 4), "cpu")
    assert torch.equal(to_cache(torch.tensor([65504.0]), torch.float16), torch.tensor([65504.0]).half())
