"""Evaluate one sample batch: pick the benchmark, compute the metrics, format them as JSON and a table.

Result keys (null / None where not computed):
  fid                FID vs the real digits (digits) or the ADM reference batch (imagenet)
  accuracy           digits only: fraction of samples the digits classifier assigns their arr_1 label
  psnr_vs_reference  PSNR in dB of the pooled MSE against --reference (data range 255; inf if identical)
  mse_vs_reference   pooled MSE against --reference on the [0, 1] pixel scale
  num_samples        N, the number of evaluated samples (FID is biased upward at small N)
The JSON also holds `notes` {key: why it is null}: an infinite PSNR (samples identical to the reference) is
written as null with its note, since JSON has no infinity; any other non-finite metric is an error.
"""
import json
import logging
import math

from vq4dit.evaluation.digits import digits_metrics, load_digits_classifier, real_digits_uint8
from vq4dit.evaluation.imagenet import import_torch_fidelity, inception_fid
from vq4dit.evaluation.metrics import paired_mse, psnr_from_mse
from vq4dit.evaluation.samples import check_labels, check_pairing, check_reference, label_kind, load_samples
from vq4dit.models.digits import IMAGE_SIZE, NUM_CLASSES
from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import ResultKind, check_result_file, write_text_atomic
from vq4dit.utils.resources import DIGITS_CLASSIFIER

logger = logging.getLogger(__name__)

KINDS = ("digits", "imagenet")
NUM_CLASSES_OF_KIND = {"digits": NUM_CLASSES, "imagenet": 1000}
RESULT_KEYS = ("fid", "accuracy", "psnr_vs_reference", "mse_vs_reference", "num_samples")


def resolve_kind(kind, image_shape):
    """The benchmark for images (N, H, W, 3): `kind` if given (checked), else digits iff 16x16."""
    height, width = image_shape[1:3]
    is_digits_size = (height, width) == (IMAGE_SIZE, IMAGE_SIZE)
    if kind is None:
        return "digits" if is_digits_size else "imagenet"
    if kind not in KINDS:
        raise UserError(f"--kind {kind}: unknown; valid: {', '.join(KINDS)}")
    if kind == "digits" and not is_digits_size:
        raise UserError(f"--kind digits: samples are {height}x{width}; digits samples must be "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    return kind


def evaluate_files(samples_path, reference_path=None, kind=None, ref_batch_path=None, classifier_path=None):
    """Metrics of the samples .npz at `samples_path` as a dict with RESULT_KEYS.

    digits: FID and accuracy with the classifier at `classifier_path` (default weights file).
    imagenet (and text-to-image samples): FID against the ADM batch `ref_batch_path` (torch-fidelity), when given.
    Either kind: paired PSNR/MSE against `reference_path`, FP samples from the same seeds and labels. Videos
    (N, F, H, W, 3): the paired metrics over every frame, and nothing else.
    """
    images, labels = load_samples(samples_path)
    if images.ndim == 5:
        return evaluate_videos(images, labels, samples_path, reference_path, kind, ref_batch_path)
    prompted = label_kind(samples_path) == "prompts"
    kind = resolve_kind(kind if kind is not None or not prompted else "imagenet", images.shape)
    if prompted and kind == "digits":
        raise UserError(f"{samples_path}: text-to-image samples (arr_1 holds prompt indices, not class ids); the "
                        "digits benchmark scores DiT-Digits class samples with its classifier; for these give "
                        "--reference FP.npz (paired PSNR/MSE against full-precision samples) and/or --ref-batch "
                        "REAL.npz (FID against real images)")
    if labels is not None and not prompted:
        check_labels(labels, images.shape[0], NUM_CLASSES_OF_KIND[kind], samples_path)
    fid = kind == "digits" or ref_batch_path is not None
    if images.shape[0] < 2 and fid:
        raise UserError(f"{samples_path}: has {images.shape[0]} image; FID needs at least 2")
    if kind == "digits" and ref_batch_path is not None:
        raise UserError(f"--ref-batch {ref_batch_path}: only used with --kind imagenet; digits FID is "
                        "against the real digits set")
    if kind == "imagenet" and ref_batch_path is None and reference_path is None:
        raise UserError("--ref-batch or --reference: required for --kind imagenet and text-to-image samples (an ADM "
                        "reference batch .npz such as VIRTUAL_imagenet256_labeled.npz for FID, and/or full-precision "
                        "samples of the same seeds for a paired PSNR/MSE)")
    result = dict.fromkeys(RESULT_KEYS)
    result["num_samples"] = int(images.shape[0])

    if reference_path is not None:
        result.update(paired_metrics(images, labels, samples_path, reference_path))

    if kind == "digits":
        classifier = load_digits_classifier(classifier_path or DIGITS_CLASSIFIER)
        real_images, _ = real_digits_uint8()
        result.update(digits_metrics(classifier, images, labels, real_images))
    elif fid:  # without a reference batch: the paired metrics alone
        import_torch_fidelity()  # fail before reading a large reference batch
        ref_batch, _ = load_samples(ref_batch_path)
        if ref_batch.ndim != 4:
            raise UserError(f"--ref-batch {ref_batch_path}: holds videos {ref_batch.shape}; an ADM reference batch "
                            "holds images (N, H, W, 3)")
        result["fid"] = inception_fid(images, ref_batch)
    check_finite_metrics(result, samples_path)
    return result


def paired_metrics(images, labels, samples_path, reference_path):
    """{mse_vs_reference, psnr_vs_reference} of the samples against the reference at `reference_path`, once the
    two are known to pair sample for sample (shape, labels, recorded sampling settings)."""
    ref_images, ref_labels = load_samples(reference_path)
    # the recorded settings first: they say why the rest differs (other prompts: "prompts ...", not "label 0 at ...")
    check_pairing(samples_path, reference_path)
    check_reference(images, labels, ref_images, ref_labels, reference_path)
    mse = paired_mse(images, ref_images)
    return {"mse_vs_reference": mse, "psnr_vs_reference": psnr_from_mse(mse)}


def evaluate_videos(videos, labels, samples_path, reference_path, kind, ref_batch_path):
    """The metrics of videos (N, F, H, W, 3): the paired MSE / PSNR over every frame against --reference; FID and
    the digits benchmark score images."""
    flags = [f for f, value in (("--kind", kind), ("--ref-batch", ref_batch_path)) if value is not None]
    if flags:
        raise UserError(f"{', '.join(flags)}: {samples_path} holds videos; FID and the digits benchmark score images "
                        "(give --reference FP.npz alone: a paired PSNR/MSE over every frame)")
    if reference_path is None:
        raise UserError(f"--reference: required for {samples_path}, which holds videos (N, F, H, W, 3): give the "
                        "full-precision videos of the same seeds and prompts for a paired PSNR/MSE over every frame")
    result = {**dict.fromkeys(RESULT_KEYS), "num_samples": int(videos.shape[0])}
    result.update(paired_metrics(videos, labels, samples_path, reference_path))
    check_finite_metrics(result, samples_path)
    return result


def check_finite_metrics(result, samples_path):
    """Every metric a finite number, or None; a PSNR of the samples identical to the reference is infinite."""
    for key in RESULT_KEYS:
        value = result[key]
        identical = key == "psnr_vs_reference" and result["mse_vs_reference"] == 0
        if value is not None and not math.isfinite(value) and not identical:
            raise UserError(f"{samples_path}: {key} came out {value}; the samples or the reference are degenerate "
                            "(e.g. all images equal), no finite value to report")


def result_to_json(result):
    """JSON text of a result (strict JSON: no NaN or Infinity); an infinite PSNR (identical to the reference) is
    written as null, with the reason in `notes`."""
    values, notes = {k: result[k] for k in RESULT_KEYS}, {}
    if values["psnr_vs_reference"] == math.inf:
        values["psnr_vs_reference"] = None
        notes["psnr_vs_reference"] = "infinite: the samples are identical to the reference (mse 0)"
    return json.dumps({**values, "notes": notes}, indent=2, allow_nan=False) + "\n"


def check_result_path(path):
    """A one-line UserError, before any work, when the result JSON cannot be written at `path`."""
    check_result_file("--json", path, ResultKind("an evaluate.py result", RESULT_KEYS), "eval.json")


def write_result_json(path, result):
    write_text_atomic(path, result_to_json(result))


def format_table(result):
    """A two-column plain-text table of the result."""
    def show(value):
        if value is None:
            return "-"
        return str(value) if isinstance(value, int) else f"{value:.6g}"

    rows = [(k, show(result[k])) for k in RESULT_KEYS]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
