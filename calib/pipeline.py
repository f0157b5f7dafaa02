"""The quantization job: load the FP model, build codebooks, calibrate, save the artifact.

`quantize(config, out_dir)` is everything `quantize.py` does after parsing its arguments.
"""
import copy
import logging
import os
import time

from calib.config import QuantizeConfig
from calib.state import config_hash, read_state_meta, remove_state
from models.images import resolve_device
from models.loading import load_dit
from utils.errors import UserError

logger = logging.getLogger(__name__)


def check_out_dir(out_dir):
    """Create `out_dir` or fail early with a one-line error, before any expensive work."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable")


def quantize(config: QuantizeConfig, out_dir, progress=True):
    """Run the configured method and write the artifact to out_dir; returns per-block calibration stats."""
    from calib.run import calibrate
    from vq import quantize_linears, save_quantized

    check_out_dir(out_dir)
    calibrated = config.method in ("vq4dit", "codebook")
    if calibrated:  # a state left by another config must fail now, not after loading and k-means
        read_state_meta(out_dir, config_hash(config))
    device = resolve_device(config.device)
    start = time.time()
    model, spec = load_dit(config.model, config.ckpt, config.image_size, config.num_classes, device=device)
    stats = []
    if config.method == "rtn":
        from vq.rtn import quantize_linears_rtn

        quantize_linears_rtn(model, config.wbits)
    else:
        # the FP teacher, copied before its Linears are replaced, instead of loading the checkpoint again
        teacher = copy.deepcopy(model) if calibrated else None
        soft = config.method == "vq4dit"
        qlayers = quantize_linears(model, config.k, config.dim, candidates=config.candidates if soft else 1,
                                   split_qkv=config.split_qkv, kmeans_iters=config.kmeans_iters, seed=config.seed,
                                   ratio_init=config.ratio_init, progress=progress)
        if calibrated:
            stats = calibrate(model, qlayers, config, out_dir, teacher=teacher, progress=progress)
        for layer in qlayers.values():
            if not layer.is_hard:
                layer.harden()
    save_quantized(model, spec, out_dir, config.to_dict())
    remove_state(out_dir)
    logger.info("quantized %s with %s in %.1f s -> %s", config.model, config.method, time.time() - start, out_dir)
    return stats
