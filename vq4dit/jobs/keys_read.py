"""Which config keys a run reads: the keys a method or calibration mode never reads, refused when given on the
command line or as API keywords (they would do nothing), and the flags of a shared list a method reads."""
from vq4dit.jobs.config import FIELDS, load_config
from vq4dit.utils.errors import UserError
from vq4dit.utils.knobs import flag_name, key_name

# keys a method or mode never reads: given on the command line (or as API keywords) they would do nothing, so they
# are refused; a YAML preset may carry them (one preset serves every --method)
_UNCALIBRATED = {"teacher", "calibration", "cache"}
_SOFT_ONLY = {"candidates", "ratio_init", "lr_ratio", "lambda_r", "ratio_reg", "ratio_gate", "select_every"}
_ONLINE_ONLY = {"online_batch", "student_label_dropout"}


def ignored_keys(config):
    """{key: why} of the keys `config`'s method and calibration mode ignore."""
    calibrates = config.method not in ("rtn", "kmeans")
    sections = set() if calibrates else _UNCALIBRATED
    if config.codebooks.bits is not None:  # --bits: the sensitivity probes run the teacher (jobs/allocation.py)
        sections = sections - {"teacher"}
    keys = {k: f"--method {config.method} does not calibrate" for s in sections for k in FIELDS[s]}
    if config.method == "rtn":
        keys.update({k: "--method rtn rounds each weight to --wbits bits (no codebooks)"
                     for k in FIELDS["codebooks"] if k != "wbits"})
    if config.method == "kmeans":
        keys["codebook_init"] = "the output-aware fit is a step of calibration, which --method kmeans does not run"
    if config.method in ("kmeans", "codebook"):
        keys.update({k: f"--method {config.method} keeps every sub-vector at one codeword (no candidates or ratios)"
                     for k in _SOFT_ONLY if k in FIELDS["codebooks"] or config.method == "codebook"})
    if calibrates and config.calibration.calib != "online":
        keys.update({k: f"only --calib online reads it (this run: --calib {config.calibration.calib})"
                     for k in _ONLINE_ONLY})
    if calibrates and config.calibration.calib == "online":
        keys["calib_timesteps"] = "--calib online trains on every sampler step of each trajectory"
    if not calibrates and config.codebooks.bits is not None:
        keys.update({k: f"--bits probes the teacher in a small run of its own and --method {config.method} does "
                        "not calibrate" for k in ("calib_samples", "calib_timesteps", "online_batch")})
    return keys


def check_not_ignored(config, given, source="command line"):
    """UserError naming every key of `given` (keys set on the command line, or API keywords: `source`, as load_config
    names it) that `config` ignores, grouped by why, as flags or as keywords."""
    ignored = ignored_keys(config)
    found = sorted(k for k in given if k in ignored)
    if not found:
        return config
    groups = {}
    for key in found:
        groups.setdefault(ignored[key], []).append(flag_name(key) if source == "command line" else key)
    parts = [f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} nothing here: {why}"
             for why, names in groups.items()]
    raise UserError(f"{'; '.join(parts)}; drop {'it' if len(found) == 1 else 'them'}")


def ignored_by(method):
    """{key: why} of the keys a run of `method` with the other settings at their defaults ignores."""
    return ignored_keys(load_config(overrides={"method": method}))


def flags_read_by(settings, argv):
    """The flags of `argv` (each with its value, when one follows) that a run of `settings` reads ({key: value}
    overrides, e.g. {"method": "rtn"} or {"recipe": "authors"}): one set of extra flags for every row of a benchmark
    or test, since quantize refuses the others."""
    ignored, kept, i = ignored_keys(load_config(overrides=settings)), [], 0
    while i < len(argv):
        item = argv[i:i + 2] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else argv[i:i + 1]
        if key_name(argv[i]) not in ignored:
            kept += item
        i += len(item)
    return kept
