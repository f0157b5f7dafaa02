import copy

import pytest
import torch

from calib.metrics import block_mse, chain_mse, noise_mse
from tests.calib.conftest import tiny_dit


def perturbed(model, scale=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.blocks.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_chain_and_block_mse_match_a_direct_computation():
    fp = tiny_dit(depth=3)
    q = perturbed(fp)
    tokens, c = torch.randn(5, 16, 32), torch.randn(5, 32)
    with torch.no_grad():
        h, h_fp, expected = tokens, tokens, []
        for block, fp_block in zip(q.blocks, fp.blocks):
            h, h_fp = block(h, c), fp_block(h_fp, c)
            expected.append(((h - h_fp) ** 2).mean().item())
        target = fp.blocks[0](tokens, c)
        one = ((q.blocks[0](tokens, c) - target) ** 2).mean().item()
    assert chain_mse(q.blocks, fp.blocks, tokens, c, "cpu", batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert chain_mse(fp.blocks, fp.blocks, tokens, c, "cpu") == [0.0, 0.0, 0.0]
    out = torch.empty_like(tokens)
    assert block_mse(q.blocks[0], tokens, c, target, "cpu", batch_size=2, out=out) == pytest.approx(one, rel=1e-5)
    torch.testing.assert_close(out, q.blocks[0](tokens, c).detach())


def test_noise_mse_uses_only_the_eps_channels():
    fp = tiny_dit()
    q = perturbed(fp)
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    with torch.no_grad():
        expected = ((q(x, t, y)[:, :1] - fp(x, t, y)[:, :1]) ** 2).mean().item()
    assert noise_mse(q, fp, x, t, y, "cpu", batch_size=3) == pytest.approx(expected, rel=1e-5)
