"""Fitting a quantize run to its device before it starts: `--stream auto` and the update's micro-batch, from the
memory plan (jobs/memory_plan.py).

On a CUDA device whose memory (less RESERVE_BYTES) the unstreamed plan exceeds, the run streams (jobs/streaming.py);
and when the streamed plan still exceeds it and no `--micro-batch` was given, each update runs in micro-batches of
the largest power of two of rows whose plan fits (calib/micro.py: the same update, summed in another order). The
resolved values are the config the run saves in config.yaml. On the CPU nothing changes: auto means off and the
whole minibatch, so a CPU run's artifact never depends on the machine's memory.
"""
import logging

import torch

from vq4dit.jobs.methods import METHODS
from vq4dit.jobs.streaming import check_streamable
from vq4dit.utils import distributed
from vq4dit.utils.device import device_memory

logger = logging.getLogger(__name__)

RESERVE_BYTES = 2 * 2**30  # the CUDA context and the allocator's slack, which the plan does not count


def fit_to_device(config, device):
    """QuantizeConfig `config` as it runs on `device`: --stream on or off as given; auto on a CUDA device: on when the
    unstreamed plan's device peak exceeds the device's memory less RESERVE_BYTES (a model the plan cannot take: off),
    then, without a --micro-batch, the largest micro-batch whose streamed plan fits; auto elsewhere: unchanged
    (off). A streamed run that cannot stream is a UserError."""
    device = torch.device(device)
    if config.stream == "auto" and device.type == "cuda":
        # under torchrun every process takes the same path (the streamed build's collectives differ): the least room
        room = int(distributed.all_min(device_memory(device) - RESERVE_BYTES))
        config = fit_cuda(config, room, str(device))
    if config.stream == "on":
        check_streamable(config)
    return config


def device_peak(config):
    """The planned device peak of `config` in bytes (None: a model the plan cannot take)."""
    from vq4dit.jobs.memory_plan import plan_for

    try:
        plan = plan_for(config)
    except Exception as e:  # a pipeline the plan cannot run on meta (any error of its tracing): run as before
        logger.warning("--stream auto: no memory plan (%s: %s); not streaming", type(e).__name__, e)
        return None
    return None if plan is None else plan.peaks.device_peak.device_bytes


def halvings(rows):
    """rows, then the powers of two below it, down to 1: 16 -> [16, 8, 4, 2, 1]; 12 -> [12, 8, 4, 2, 1]."""
    return [rows] + [1 << p for p in range((rows - 1).bit_length() - 1, -1, -1)]


def fit_cuda(config, room, where):
    """fit_to_device's choice for `room` bytes of the CUDA device `where`."""
    need = device_peak(config.replace(stream="off"))
    if need is None or need <= room:
        return config.replace(stream="off")
    if config.codebooks.bits is not None and config.codebooks.bits_probe != "block":  # check_streamable
        logger.warning("the plan needs %.1f GiB, more than the %.1f GiB usable on %s, but --bits with --bits-probe "
                       "%s runs unstreamed (--bits-probe block streams); the run may run out of memory", need / 2**30,
                       room / 2**30, where, config.codebooks.bits_probe)
        return config.replace(stream="off")
    gib = 2**30
    logger.info("--stream auto: the plan needs %.1f GiB of the %.1f GiB usable on %s; streaming the model block by "
                "block", need / gib, room / gib, where)
    calibration = config.calibration
    tries = [calibration.micro_batch]
    if calibration.micro_batch is None and METHODS[config.method].calibrated:
        tries = halvings(calibration.batch_size)
    for rows in tries:
        whole = rows is None or rows >= calibration.batch_size
        fitted = config.replace(stream="on", micro_batch=None if whole else rows)
        need = device_peak(fitted)
        if need is None or need <= room:
            break
    if fitted.calibration.micro_batch is not None and need is not None:
        logger.info("--stream auto: each update in micro-batches of %d rows (the plan: %.1f GiB)", rows, need / gib)
    if need is not None and need > room:
        logger.warning("the streamed plan needs %.1f GiB, more than the %.1f GiB usable on %s; the run may run out of "
                       "memory (a smaller --batch-size, or a device with more memory)", need / gib, room / gib, where)
    return fitted
