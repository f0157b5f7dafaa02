"""Config fields users set by YAML key and by flag ("knobs"): each declares its help text, and its valid values where
they are a fixed set, once, on the dataclass field. The entry script's flags are built from those declarations
(add_flags) and the configs' validate() checks the same choices (declared_choices), so the two cannot drift."""
import dataclasses
import typing


def knob(default, help, choices=None):
    """A dataclass field with default `default` that users set by YAML key and flag: `help` is its flag's help and
    `choices` (when given) the only values validate() accepts."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=metadata)


def declared_choices(config):
    """{field name: valid values} for the fields of the dataclass (or instance) `config` that declare choices."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(config) if "choices" in f.metadata}


def base_type(kind):
    """The type a field of type `kind` holds when it is set: int for `int | None`, str for `str`."""
    return next(a for a in typing.get_args(kind) or (kind,) if a is not type(None))


def flag_name(name):
    return "--" + name.replace("_", "-")


def key_name(flag):
    """flag_name's inverse: "--calib-samples" -> "calib_samples"."""
    return flag[2:].replace("-", "_")


def knobs(kinds, order):
    """{name: the dataclass field} for the knob fields of the dataclasses `kinds`, in `order`, which must name each of
    them exactly once (a knob without a flag, or a flag without a knob, is a programming error)."""
    declared = {f.name: f for kind in kinds for f in dataclasses.fields(kind) if "help" in f.metadata}
    if sorted(declared) != sorted(order):
        raise ValueError(f"flag order and knob fields differ: {sorted(set(declared) ^ set(order))}")
    return {name: declared[name] for name in order}


def flag_help(f):
    """A knob's --help text: its help and its default (a preset or --recipe may set another), unless the help says
    what its default means (None: "the pipeline's", "every Linear in the blocks", ...)."""
    if "default" in f.metadata["help"]:
        return f.metadata["help"]
    default = f.default
    shown = "off" if default is False else "on" if default is True else "none" if default is None else default
    return f"{f.metadata['help']} (default: {shown})"


def add_flags(parser, kinds, order):
    """Add to `parser` one flag per knob (--image-size for image_size), in `order`: its type from the field, a bool
    as a store_true switch, and default None, so that a flag not given leaves the YAML preset's value in place."""
    for name, f in knobs(kinds, order).items():
        if base_type(f.type) is bool:
            parser.add_argument(flag_name(name), action="store_true", default=None, help=flag_help(f))
        else:
            parser.add_argument(flag_name(name), type=base_type(f.type), default=None, help=flag_help(f))


def text_flags(args, kinds, order):
    """{flag: value given or None} for the str-typed knobs among the parsed `args` (for utils.cli.check_not_blank)."""
    return {flag_name(name): getattr(args, name) for name, f in knobs(kinds, order).items() if base_type(f.type) is str}
