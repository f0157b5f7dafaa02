import numpy as np
import pytest
import torch

from vq4dit.models.vae import LATENT_SCALE, decode, load_vae, to_uint8
from vq4dit.utils.errors import UserError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def tiny_vae_dir(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=8)
    vae.save_pretrained(tmp_path)
    return tmp_path, vae.eval()


@torch.no_grad()
def test_decode_divides_by_latent_scale(tiny_vae_dir):
    path, reference = tiny_vae_dir
    vae = load_vae(str(path))
    latents = torch.randn(3, 4, 4, 4)
    got = decode(vae, latents, batch_size=2)
    expected = reference.decode(latents / LATENT_SCALE).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    images = to_uint8(latents, vae)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8


def test_pixel_models_skip_vae_and_bad_vae_is_user_error(tmp_path):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert to_uint8(x).shape == (2, 16, 16, 3)
    with pytest.raises(UserError, match="--vae"):
        load_vae(str(tmp_path / "missing"))
