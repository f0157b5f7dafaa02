"""Whether a source given on the command line names a Hugging Face Hub repo (owner/name) or a local path."""
import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells repo ids


def hub_id_like(source):
    """Whether `source`, which does not exist here, reads as a hub repo id owner/name (then it is looked up)."""
    return bool(HUB_ID.fullmatch(os.fspath(source)))


def local_reading(source):
    """For the error of a hub lookup that failed: how `source` reads as a local path when its owner part is a local
    directory (`outputs/w2` before the run that writes it, or a typo in it): " (outputs/ is a local directory
    without w2)", else ""."""
    owner, _, name = os.fspath(source).partition("/")
    return f" ({owner}/ is a local directory without {name})" if os.path.isdir(owner) else ""
