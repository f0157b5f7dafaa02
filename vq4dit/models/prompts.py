"""Prompt lists of text-to-image models: a --prompts file, or the built-in class-name prompts (zero data).

The built-in list is "a photo of a <class name>" for 100 everyday object and animal classes: no images, no
captions from any data set, only names, as the zero-data teacher of VQ4DiT needs (class labels for DiT, class
names for a text-to-image model). Sample i of a run is conditioned on prompts[i % len(prompts)].
"""
from pathlib import Path

from vq4dit.utils.errors import UserError

CLASS_NAMES = (
    "goldfish", "great white shark", "tree frog", "loggerhead turtle", "green lizard", "king snake", "flamingo",
    "pelican", "bald eagle", "barn owl", "peacock", "penguin", "hummingbird", "parrot", "swan", "golden retriever",
    "border collie", "dalmatian", "husky", "pug", "tabby cat", "siamese cat", "lion", "tiger", "snow leopard",
    "brown bear", "polar bear", "panda", "koala", "kangaroo", "zebra", "giraffe", "elephant", "rhinoceros",
    "hippopotamus", "camel", "horse", "cow", "sheep", "pig", "rabbit", "squirrel", "hedgehog", "fox", "wolf",
    "deer", "monkey", "orangutan", "butterfly", "ladybug", "honeybee", "jellyfish", "octopus", "starfish", "crab",
    "lobster", "coral reef", "sunflower", "red rose", "tulip field", "cactus", "bonsai tree", "mushroom",
    "strawberry", "pineapple", "banana bunch", "lemon", "pizza", "hamburger", "cup of coffee", "birthday cake",
    "bowl of ramen", "sports car", "red double-decker bus", "steam locomotive", "sailboat", "airliner",
    "hot air balloon", "bicycle", "motorcycle", "fire truck", "lighthouse", "castle", "wooden bridge",
    "mountain lake", "volcano", "waterfall", "desert dunes", "snowy forest", "city skyline at night",
    "grand piano", "acoustic guitar", "violin", "vintage camera", "wristwatch", "teapot", "umbrella", "backpack",
    "armchair", "table lamp",
)
BUILTIN_PROMPTS = tuple(f"a photo of a {name}" for name in CLASS_NAMES)


def read_prompts(path):
    """The prompts of a text file, one per line (surrounding whitespace stripped, blank lines skipped); a missing,
    unreadable, non-UTF-8 or empty file is a UserError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def prompt_list(prompts=None):
    """`prompts` (a list of strings) as a list, or the built-in class-name prompts when None or empty."""
    if not prompts:
        return list(BUILTIN_PROMPTS)
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise UserError(f"prompts must be non-empty strings, got {bad[0]!r}")
    return list(prompts)
