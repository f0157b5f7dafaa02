"""The embedded data set: scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16."""
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits_images(size=IMAGE_SIZE):
    """All 1797 digits as (N, 1, size, size) floats in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(data.target).long()


def split_indices(n, seed=0, test_fraction=0.2):
    """A fixed train/test split of range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * test_fraction)
    return perm[n_test:], perm[:n_test]
