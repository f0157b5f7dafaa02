"""Whether a source given on the command line names a Hugging Face Hub repo (owner/name) or a local path."""
import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells repo ids


def hub_id_like(source):
    """Whether `source`, which does not exist here, reads as a hub repo id: owner/name, whose owner is not a local
    directory. `outputs/w2` before a run wrote it (the README's own path, or a typo in it) is a missing local path,
    not a repo to look up over the network."""
    text = os.fspath(source)
    return bool(HUB_ID.fullmatch(text)) and not os.path.isdir(text.split("/")[0])
