"""What a quantize run refuses of its config before loading anything; `--dry-run` asks the same, so that a plan is
not printed for a run that would stop in its first second.

Whether the named CUDA device is present is the run's own check (utils.device.resolve_device): a dry run may plan a
run for a GPU machine on a laptop.
"""
from vq4dit.jobs.keys_read import ignored_keys
from vq4dit.utils.device import check_device_name
from vq4dit.utils.fileio import check_dir_usable


def check_inputs(config):
    """UserErrors, in the run's words, for QuantizeConfig `config`: a --device that names no device, a --cache-dir
    the run uses that is no usable directory (or has a file in the way), --stream on for what a streamed run does
    not do."""
    check_device_name(config.device)
    if config.cache.cache_dir and "cache_dir" not in ignored_keys(config):  # a preset's, unused by k-means or rtn
        check_dir_usable(config.cache.cache_dir, "--cache-dir")
    if config.stream == "on":
        from vq4dit.jobs.streaming import check_streamable

        check_streamable(config)
