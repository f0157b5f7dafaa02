"""ImageNet FID through torch-fidelity (an optional extra: `pip install torch-fidelity`, which pulls torchvision).

The samples .npz is the ADM evaluator's input; the reference is an ADM reference batch
(e.g. VIRTUAL_imagenet256_labeled.npz), whose arr_0 images are pushed through the same network.
torch-fidelity's `inception-v3-compat` is a port of the TensorFlow Inception the ADM suite uses,
with TF-style bilinear resizing to 299x299, so its FID tracks the ADM numbers closely but is not
bit-identical; quote the ADM suite for paper tables. The ADM batch's precomputed `mu`/`sigma` are
not used, so both sides come from one network. The Inception weights are downloaded by
torch-fidelity on first use (into the torch hub cache).
"""
import logging

import torch

from vq4dit.evaluation.metrics import warn_small_fid
from vq4dit.utils.errors import UserError

logger = logging.getLogger(__name__)


def import_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise UserError("--kind imagenet: FID needs the optional package torch-fidelity, which is not installed; "
                        "install it with `pip install torch-fidelity`") from None
    return torch_fidelity


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) numpy images served as uint8 (3, H, W) tensors, as torch-fidelity expects."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()


INCEPTION_DIMS = 2048  # Inception pool_3 features


def inception_fid(images, ref_images, batch_size=100):
    """FID (Inception pool_3, 2048-d) between uint8 (N, H, W, 3) samples and reference images."""
    torch_fidelity = import_torch_fidelity()
    metrics = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(images), input2=_UInt8Images(ref_images), fid=True, batch_size=batch_size,
        cuda=torch.cuda.is_available(), cache=False, verbose=False)
    fid = float(metrics["frechet_inception_distance"])
    warn_small_fid(len(images), INCEPTION_DIMS, logger)
    logger.info("imagenet: fid %.4f over %d samples vs %d reference images", fid, len(images), len(ref_images))
    return fid
