"""Reading a YAML config file strictly: a mapping, each key once, every problem one UserError naming the file."""
import re

import yaml

from vq4dit.utils.errors import UserError
from vq4dit.utils.resources import preset_names


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float with an exponent and no dot, `lr: 1e-2`, as the string "1e-2"; YAML 1.2 and every
# command line read it as a number, and so does a config here
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))


def read_yaml(path):
    """A YAML file that must hold a mapping; every problem is a UserError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise UserError(f"cannot read config {path}: no such file, and no preset of that name (presets: "
                        f"{', '.join(preset_names())})") from None
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of keys to values, got {type(values).__name__}")
    return values
