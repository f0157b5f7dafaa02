import argparse
from dataclasses import dataclass

import pytest

from vq4dit.utils.knobs import add_flags, declared_choices, knob, text_flags


@dataclass
class Toy:
    size: int | None = knob(None, "a size")
    mode: str = knob("a", "a | b", ("a", "b"))
    switch: bool = knob(False, "a switch")
    hidden: float = 0.5  # no knob: YAML only, no flag


def parse(argv, order=("mode", "size", "switch")):
    parser = argparse.ArgumentParser()
    add_flags(parser, (Toy,), order)
    return parser, parser.parse_args(argv)


def test_flags_take_type_help_and_order_from_the_knobs_and_default_to_none():
    parser, args = parse([])
    assert vars(args) == {"mode": None, "size": None, "switch": None}  # not given: the preset's value stays
    assert [a.option_strings for a in parser._actions[1:]] == [["--mode"], ["--size"], ["--switch"]]
    # --help shows each default (mutation: the help alone)
    assert [a.help for a in parser._actions[1:]] == ["a | b (default: a)", "a size (default: none)",
                                                     "a switch (default: off)"]
    assert vars(parse(["--size", "3", "--switch", "--mode", "b"])[1]) == {"mode": "b", "size": 3, "switch": True}


def test_order_must_name_every_knob_once():
    """A knob without a flag, or a flag without a knob, fails when the parser is built (mutation: no check)."""
    for order in (("mode", "size"), ("mode", "size", "switch", "hidden")):
        with pytest.raises(ValueError, match="flag order and knob fields differ"):
            parse([], order)


def test_declared_choices_and_text_flags():
    assert declared_choices(Toy) == {"mode": ("a", "b")}
    assert text_flags(parse(["--mode", " "])[1], (Toy,), ("mode", "size", "switch")) == {"--mode": " "}
