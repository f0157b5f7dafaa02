"""A source owner/name is a hub repo id only when its owner is no local directory: `outputs/w2` before the run that
writes it is a missing local path, refused without a network lookup (which waited 4 s for a name-service error)."""
import huggingface_hub
import pytest

from vq4dit.models.loading import check_ckpt_exists
from vq4dit.models.pipelines import resolve_pipeline
from vq4dit.utils.errors import UserError
from vq4dit.utils.hubid import hub_id_like
from vq4dit.vq.artifact import resolve_artifact


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """cwd tmp_path holding outputs/; any hub download fails the test."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail(f"looked up {a[0]}"))


@pytest.mark.parametrize("source, expected", [("facebook/DiT-XL-2-256", True), ("outputs/w2", False),
                                              ("./w2", False), ("a/b/c", False), ("~/w2", False)])
def test_an_owner_that_is_a_local_directory_is_a_path(no_network, source, expected):
    """Mutation: the owner's directory not checked -> outputs/w2 read as a repo."""
    assert hub_id_like(source) is expected


def test_every_loader_refuses_a_missing_path_under_a_local_directory_without_the_network(no_network):
    assert resolve_artifact("outputs/w2") == "outputs/w2"  # load_quantized then names the missing directory
    assert resolve_pipeline("outputs/pipe") is None
    with pytest.raises(UserError, match="^checkpoint outputs/model does not exist; give a .pt/.safetensors file"):
        check_ckpt_exists("outputs/model")
    with pytest.raises(UserError, match="^checkpoint outputs/model.pt does not exist"):
        check_ckpt_exists("outputs/model.pt")
    with pytest.raises(pytest.fail.Exception, match="looked up someone/w2"):
        resolve_artifact("someone/w2")  # a repo id still goes to the hub
