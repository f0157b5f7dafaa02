"""The quantize job: load the base model, build codebooks, calibrate, save the artifact.

`quantize(config, out_dir)` is everything `quantize.py` does after parsing its arguments, for any model an
adapter describes (models/adapters): the project's DiT or a diffusers pipeline's transformer.
"""
import copy
import logging
import time

from calib.config import QuantizeConfig
from calib.state import config_hash, read_state_meta, remove_state
from models.adapters.base import linear_pattern, outside_blocks
from models.adapters.load import load_model
from models.prompts import read_prompts
from utils.device import resolve_device
from utils.fileio import check_out_dir
from utils.precision import set_tf32

logger = logging.getLogger(__name__)

CALIBRATED = ("vq4dit", "codebook")


def quantize(config: QuantizeConfig, out_dir, progress=True):
    """Run the configured method and write the artifact to out_dir; returns per-block calibration stats."""
    from calib.calibrate import calibrate
    from vq import quantize_linears, save_quantized
    from vq.modelref import reference
    from vq.rtn import quantize_linears_rtn

    check_out_dir(out_dir)
    prompts = read_prompts(config.prompts) if config.prompts else None  # a bad file fails before loading the model
    calibrated = config.method in CALIBRATED
    if calibrated:  # a state left by another config must fail now, not after loading and k-means
        read_state_meta(out_dir, config_hash(config))
    device = resolve_device(config.device)
    set_tf32(str(device).startswith("cuda"))  # fp32 storage, TF32 matmuls on CUDA (as the authors' code runs)
    start = time.time()
    base = load_model(config.model, config.ckpt, config.image_size, config.num_classes, config.backend, device)
    model, adapter = base.model, base.adapter
    extra = adapter.bind(base.extra, prompts, config.height, config.width, config.num_frames)
    include = linear_pattern(adapter.quant_include(model), config.include, config.exclude)
    outside = outside_blocks(adapter, model, include)
    if outside and calibrated:
        logger.warning("%d selected Linears lie outside the transformer blocks (first: %s): they are quantized but "
                       "not calibrated", len(outside), outside[0])
    stats = []
    if config.method == "rtn":
        quantize_linears_rtn(model, config.wbits, include=include)
    else:
        # the FP teacher, copied before its Linears are replaced, instead of loading the checkpoint again
        teacher = copy.deepcopy(model) if calibrated else None
        soft = config.method == "vq4dit"
        # block-wise calibration softens each block's layers when it reaches the block (calib/blockwise.py)
        lazy = soft and config.calib == "blockwise"
        qlayers = quantize_linears(model, config.k, config.dim, candidates=config.candidates if soft else 1,
                                   include=include, split_qkv=config.split_qkv, kmeans_iters=config.kmeans_iters,
                                   seed=config.seed, ratio_init=config.ratio_init, kmeans_init=config.kmeans_init,
                                   soft=soft and not lazy, progress=progress)
        if calibrated:
            stats = calibrate(model, teacher, adapter, qlayers, config, out_dir, progress=progress)
        for layer in qlayers.values():
            if not layer.is_hard:
                layer.harden()
    save_quantized(model, reference(model, **extra), out_dir, config.to_dict())
    remove_state(out_dir)
    logger.info("quantized %s with %s in %.1f s -> %s", adapter.describe(model), config.method, time.time() - start,
                out_dir)
    return stats
