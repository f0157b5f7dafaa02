"""A source owner/name that is no local path is looked up as a hub repo, whatever directories the working directory
holds (a local stabilityai/ from one download must not hide the other stabilityai/ repos); when the lookup fails and
the owner is a local directory, the error says how it reads as a local path (`outputs/w2` before the run that writes
it, or a typo in it)."""
import re

import huggingface_hub
import pytest

from vq4dit.models.loading import check_ckpt_exists, load_dit
from vq4dit.models.pipelines import resolve_pipeline
from vq4dit.utils.errors import UserError
from vq4dit.utils.hubid import hub_id_like
from vq4dit.vq.artifact import resolve_artifact


@pytest.fixture
def offline_lookups(monkeypatch, tmp_path):
    """cwd tmp_path holding outputs/; every hub lookup is recorded and fails as offline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    looked = []

    def lookup(repo_id, **kwargs):
        looked.append(repo_id)
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lookup)
    return looked


@pytest.mark.parametrize("source, expected", [("facebook/DiT-XL-2-256", True), ("outputs/w2", True),
                                              ("./w2", False), ("a/b/c", False), ("~/w2", False)])
def test_owner_name_reads_as_a_hub_id(offline_lookups, source, expected):
    assert hub_id_like(source) is expected


def test_a_failed_lookup_of_a_path_under_a_local_directory_says_so(offline_lookups):
    """Every loader looks owner/name up (mutation: a local owner directory taken as a missing path -> a hub repo of
    that owner never fetched), and its error adds how the name reads locally (mutation: the hint left out)."""
    hint = re.escape("(outputs/ is a local directory without w2)")
    with pytest.raises(UserError, match=rf"^outputs/w2: not a local directory {hint}, and fetching"):
        resolve_artifact("outputs/w2")
    with pytest.raises(UserError, match=rf"^outputs/w2 is not a local path {hint} and downloading it as a hub"):
        resolve_pipeline("outputs/w2")
    with pytest.raises(UserError, match=rf"^checkpoint outputs/w2 is not a local path {hint} and downloading"):
        load_dit(None, "outputs/w2")
    with pytest.raises(UserError, match=r"^someone/w2: not a local directory, and fetching"):
        resolve_artifact("someone/w2")
    assert offline_lookups == ["outputs/w2"] * 3 + ["someone/w2"]
    with pytest.raises(UserError, match="^checkpoint outputs/model.pt does not exist"):
        check_ckpt_exists("outputs/model.pt")
