"""Files shipped inside the package (installed as package data): YAML presets, recipes and the embedded weights.

A preset is named on the command line by its file name without .yaml (`--config dit_xl_256_w2`), which works the
same from a clone and from an installed wheel; a path to any YAML file works as before.
"""
import os

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../vq4dit
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
RECIPE_DIR = os.path.join(CONFIG_DIR, "recipes")
WEIGHTS_DIR = os.path.join(PACKAGE_DIR, "weights")
EMBEDDED_DIT = os.path.join(WEIGHTS_DIR, "dit_digits.safetensors")
DIGITS_CLASSIFIER = os.path.join(WEIGHTS_DIR, "digits_classifier.safetensors")


def preset_names():
    """The shipped presets' names, sorted (recipes are not presets: --recipe picks them)."""
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))


def config_path(value):
    """--config VALUE -> a file: an existing path as given, else the shipped preset of that bare name (with or
    without .yaml). Anything else is returned unchanged, so the reader's error names what the user typed."""
    if value is None or os.path.exists(value) or os.sep in value:
        return value
    name = value[:-5] if value.endswith(".yaml") else value
    if name in preset_names():
        return os.path.join(CONFIG_DIR, f"{name}.yaml")
    return value
