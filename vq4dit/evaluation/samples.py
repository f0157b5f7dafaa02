"""Read and validate sample batches in the ADM evaluator's .npz format.

`arr_0`: uint8 images (N, H, W, 3), or videos (N, F, H, W, 3) as sample.py writes them; optional `arr_1`: integer
labels (N,).
Every problem with a file is reported as a one-line UserError naming the file.
"""
import json
import logging
import os
import zipfile

import numpy as np

from vq4dit.utils.errors import UserError
from vq4dit.utils.imagefiles import LABEL_KINDS, LABELS_KEY, NPZ_FILE, RUN_KEY, SAMPLING_KEY

logger = logging.getLogger(__name__)


def samples_file(path, flag):
    """The samples .npz that `path` names: the file, or sample.py's samples.npz in a directory (its --out)."""
    if not os.path.isdir(path):
        return path
    inside = os.path.join(path, NPZ_FILE)
    if not os.path.isfile(inside):
        raise UserError(f"{flag} {path}: is a directory without {NPZ_FILE}; give the .npz (sample.py writes "
                        f"{NPZ_FILE} in its --out directory)")
    logger.info("%s %s: reading %s", flag, path, inside)
    return inside


def load_samples(path, num_classes=None):
    """Load `path` -> (images uint8 (N, H, W, 3), labels int64 (N,) or None).

    Labels, when present, must lie in [0, num_classes) if num_classes is given.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected an .npz with arr_0 uint8 (N, H, W, 3)")
    if not zipfile.is_zipfile(path):  # np.load would read a .npy array or refuse a pickle with another message
        raise UserError(f"{path}: not a readable .npz (not a zip archive; a .npy array is not one); expected the "
                        "output of np.savez with arr_0 uint8 (N, H, W, 3) and optional arr_1 labels")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UserError(f"{path}: no arr_0 in the archive (found {', '.join(data.files) or 'nothing'}); "
                                "expected arr_0 uint8 (N, H, W, 3) and optional arr_1 labels")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    check_images(images, path)
    if labels is not None:
        labels = check_labels(labels, images.shape[0], num_classes, path)
    what = "images" if images.ndim == 4 else f"videos of {images.shape[1]} frames"
    logger.info("%s: %d %s of %dx%d, labels %s", path, images.shape[0], what, *images.shape[-3:-1],
                "yes" if labels is not None else "no")
    return images, labels


def label_kind(path):
    """What arr_1 of the samples at `path` (already read by load_samples) holds, as sample.py records it: "classes",
    "prompts" (a text-to-image model's prompt indices), or None (not recorded: another tool, or before issue 29)."""
    with np.load(path, allow_pickle=False) as data:
        if LABELS_KEY not in data.files:
            return None
        kind = data[LABELS_KEY]
    if kind.shape != () or str(kind) not in LABEL_KINDS:
        raise UserError(f"{path}: {LABELS_KEY}={kind!r}; must be one of {', '.join(LABEL_KINDS)} (what arr_1 holds)")
    return str(kind)


def sampling_of(path):
    """The sampling settings sample.py recorded in the samples at `path` (a dict), or None (not recorded); a
    UserError for a file that is no readable .npz (a truncated one: BadZipFile)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if SAMPLING_KEY not in data.files:
                return None
            text = str(data[SAMPLING_KEY])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    try:
        settings = json.loads(text)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: {SAMPLING_KEY}={text[:80]!r}; must be the JSON object sample.py writes")
    return settings


def check_pairing(path, ref_path):
    """A paired comparison needs the samples and the reference drawn alike (seed, steps, guidance, ...): a
    UserError naming what differs, where both recorded their settings."""
    mine, theirs = sampling_of(path), sampling_of(ref_path)
    if mine is None or theirs is None:
        return
    # a key one side does not record (an older sample.py's: no prompts digest) is not known to differ
    differ = [f"{key} {theirs[key]!r} (the samples: {mine[key]!r})" for key in sorted(set(mine) & set(theirs))
              if mine[key] != theirs[key] and key != RUN_KEY]  # the run key names the model too: it differs
    if differ:
        raise UserError(f"{ref_path}: the reference was sampled with {', '.join(differ)}; a paired PSNR needs the "
                        "same seed and sampler settings")


def check_images(images, name):
    if images.dtype != np.uint8:
        raise UserError(f"{name}: arr_0 has dtype {images.dtype}; must be uint8 (N, H, W, 3)")
    if images.ndim not in (4, 5) or images.shape[-1] != 3 or 0 in images.shape:
        raise UserError(f"{name}: arr_0 has shape {images.shape}; must be (N, H, W, 3) images or (N, F, H, W, 3) "
                        "videos with N >= 1")


def check_labels(labels, n, num_classes, name):
    """Validate arr_1 and return it as int64 (N,)."""
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name}: arr_1 has shape {labels.shape} and dtype {labels.dtype}; "
                        f"must be integer labels of shape ({n},)")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{name}: arr_1 labels span [{labels.min()}, {labels.max()}]; must be in [0, {num_classes})")
    return labels.astype(np.int64)


def check_reference(images, labels, ref_images, ref_labels, ref_name):
    """The reference batch must pair image-for-image with the samples: same shape and same labels."""
    if ref_images.shape != images.shape:
        raise UserError(f"{ref_name}: reference images have shape {ref_images.shape}; "
                        f"must match the samples' {images.shape} (same seeds, same number)")
    if (labels is None) != (ref_labels is None):
        which = "the reference has arr_1 labels but the samples do not" if labels is None else \
            "the samples have arr_1 labels but the reference does not"
        raise UserError(f"{ref_name}: {which}; both or neither must have them")
    if labels is not None and not np.array_equal(labels, ref_labels):
        first = int(np.flatnonzero(labels != ref_labels)[0])
        raise UserError(f"{ref_name}: reference label {ref_labels[first]} at index {first} differs from the "
                        f"samples' {labels[first]}; the reference must use the same labels and seeds")
