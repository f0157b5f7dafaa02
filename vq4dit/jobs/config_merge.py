"""How one level of a quantize config is merged over the levels before it (defaults <- the recipe's preset <- a YAML
preset <- flags or API keywords: jobs.config.load_config): each value checked against its field's type, and the
rules where two keys say one thing (wbits and codebook_size; bits and the uniform setting)."""
import math
import typing

from vq4dit.jobs.config import KEY_TYPES, CodebookConfig, QuantizeConfig
from vq4dit.utils.errors import UserError
from vq4dit.utils.knobs import base_type


def _coerce(name, kind, value, source):
    """`value` checked against the field type `kind` (int, float, str, bool, or X | None); floats must be finite."""
    if value is None and type(None) in typing.get_args(kind):
        return None
    base = base_type(kind)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: {name}={value!r} must be a finite number")
    if base is str and isinstance(value, str) and not value.strip():  # as the flags (utils.cli.check_not_blank)
        raise UserError(f"{source}: {name}={value!r} is empty; give a value or leave the key out")
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    if base is str and isinstance(value, bool):  # YAML reads an unquoted on, off, yes, no as a boolean
        raise UserError(f"{source}: {name}={value!r} must be of type str; in YAML quote the word "
                        f"({name}: \"on\", not {name}: on)")
    raise UserError(f"{source}: {name}={value!r} must be of type {base.__name__}")


def merge(config, values, source):
    """A copy of `config` with the flat `values` applied; unknown keys name `source` and the valid keys."""
    unknown = sorted(set(values) - set(KEY_TYPES))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(KEY_TYPES))}")
    flat = config.to_dict()
    flat.update(superseded(values))
    flat.update({k: _coerce(k, KEY_TYPES[k], v, source) for k, v in values.items()})
    merged = QuantizeConfig.from_flat(flat)
    check_bits(merged.codebooks, values, source)
    return merged


def superseded(values):
    """The defaults that `values`, a later level (flags come last), restores of keys an earlier level gave, where
    both say one thing two ways: its wbits, without a codebook_size, sets aside an earlier codebook_size (which
    would override it: a YAML file's codebook_size 16 made --wbits 3 a 1-bit run); its bits sets aside an earlier
    uniform setting (wbits, dim, codebook_size), and its uniform setting an earlier bits with its settings and
    probe."""
    uniform, defaults = ("wbits", "dim", "codebook_size"), CodebookConfig()
    out = {"codebook_size": None} if "wbits" in values and "codebook_size" not in values else {}
    if "bits" in values:
        out |= {key: getattr(defaults, key) for key in uniform if key not in values}
    elif any(key in values for key in uniform):
        out |= {key: getattr(defaults, key) for key in ("bits", "bits_settings", "bits_probe") if key not in values}
    return out


def check_bits(codebooks, given, source):
    """wbits and codebook_size given together (in one YAML file, the flags, the API's keywords) must agree: k
    overrides 2^(wbits*dim) silently only when wbits comes from an earlier level (docs/api.md asked for wbits=2 with
    codebook_size=16, dim=4 and got 1 bit)."""
    w, d, k = codebooks.wbits, codebooks.dim, given.get("codebook_size")
    if k is None or "wbits" not in given or w < 1 or d < 1 or (w * d <= 16 and 2 ** (w * d) == k):
        return
    raise UserError(f"{source}: wbits={w} with dim={d} means codebook_size 2^({w}*{d}) = "
                    f"{2 ** (w * d) if w * d <= 16 else f'2^{w * d}'}, but codebook_size={k} is given "
                    f"({math.log2(max(k, 1)) / d:g} bit(s) per weight); give one of wbits and codebook_size")
