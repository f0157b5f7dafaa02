"""Model references: class + config rebuild the project DiT and a diffusers DiT on the meta device, buffers real;
only trusted classes are ever imported."""
import json

import pytest
import torch
from torch import nn

from tests.conftest import randomize
from vq4dit.models.dit import DiT
from vq4dit.utils.errors import UserError
from vq4dit.vq.modelref import build_skeleton, model_class, parameters_on_meta, reference

DIGITS = {"name": "DiT-Digits/2", "input_size": 8, "num_classes": 10, "in_channels": 1}


def tiny_diffusers_dit():
    """diffusers' own tiny test config (docs/method.md "The diffusers DiT family"), random weights, built offline."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=4,
                                 num_layers=1, patch_size=2, sample_size=8, num_embeds_ada_norm=1000).eval()


def assert_skeleton(skeleton, model):
    """Every parameter on meta with the original's shape; every buffer real and equal to the original's."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in params.items()}
    assert all(p.is_meta for p in skeleton.parameters())
    assert {n for n, _ in skeleton.named_buffers()} == set(buffers)
    for name, b in skeleton.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[name]), name
    assert all(p.requires_grad == params[n].requires_grad for n, p in skeleton.named_parameters())


def test_project_dit_round_trip():
    model = randomize(DiT.from_config(DIGITS))
    ref = reference(model, name="DiT-Digits/2")
    assert ref == {"class": "vq4dit.models.dit.DiT", "name": "DiT-Digits/2",
                   "config": {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 128, "depth": 6,
                              "num_heads": 4, "mlp_ratio": 4.0, "num_classes": 10, "learn_sigma": True}}
    assert json.loads(json.dumps(ref)) == ref
    skeleton = build_skeleton(ref)
    assert type(skeleton) is DiT and skeleton.config == model.config
    assert_skeleton(skeleton, model)
    skeleton.load_state_dict(model.state_dict(), assign=True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    assert torch.equal(skeleton(x, t, y), model(x, t, y))


def test_registry_form_of_format_1_artifacts():
    """{name, input_size, num_classes, in_channels, learn_sigma} builds the registry architecture."""
    with torch.device("meta"):
        model = DiT.from_config({"name": "DiT-S/4", "input_size": 32, "num_classes": 1000, "in_channels": 4,
                                 "learn_sigma": True})
    assert model.config == {"input_size": 32, "patch_size": 4, "in_channels": 4, "hidden_size": 384, "depth": 12,
                            "num_heads": 6, "mlp_ratio": 4.0, "num_classes": 1000, "learn_sigma": True}
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'"):
        DiT.from_config({**DIGITS, "name": "DiT-Q/2"})


def test_diffusers_dit_round_trip():
    model = tiny_diffusers_dit()
    ref = reference(model, pipeline={"class": "DiTPipeline"})
    assert ref["class"] == "diffusers.models.transformers.dit_transformer_2d.DiTTransformer2DModel"
    assert type(ref["config"]) is dict and ref["pipeline"] == {"class": "DiTPipeline"}
    assert not any(k.startswith("_") for k in ref["config"])  # diffusers' bookkeeping is not a constructor argument
    assert ref["config"]["num_embeds_ada_norm"] == 1000 and json.loads(json.dumps(ref)) == ref
    skeleton = build_skeleton(ref)
    assert_skeleton(skeleton, model)  # pos_embed: a non-persistent buffer computed in __init__, in no state dict
    assert "pos_embed.pos_embed" not in model.state_dict()
    skeleton.load_state_dict(model.state_dict(), assign=True)
    skeleton.eval()  # in training mode diffusers drops class labels
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 7])
    out = skeleton(x, timestep=t, class_labels=y).sample
    assert torch.equal(out, model(x, timestep=t, class_labels=y).sample)


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.Popen", "tests.conftest.randomize",
                                  "models", "vq4dit.models.dit.", "models..dit.DiT", "models.dit.DiT; import os", None])
def test_untrusted_classes_are_refused(path):
    with pytest.raises(UserError, match="is not allowed"):
        model_class({"class": path, "config": {}})


@pytest.mark.parametrize("path", ["vq4dit.models.dit.NoSuchClass", "vq4dit.models.nosuchmodule.DiT",
                                  "vq4dit.models.dit.math", "vq4dit.models.dit.modulate",
                                  "vq4dit.models.loading.DiTSpec", "vq4dit.models.dit.Mlp"])
def test_trusted_names_that_are_no_rebuildable_model_are_refused(path):
    with pytest.raises(UserError, match=f"model class '{path}' does not exist"):
        model_class({"class": path, "config": {}})


def test_a_model_outside_the_trusted_packages_cannot_be_referenced():
    class Local(nn.Module):
        config = {}

        @classmethod
        def from_config(cls, config):
            return cls()

    with pytest.raises(UserError, match="is not allowed"):
        reference(Local())
    with pytest.raises(TypeError, match="no `config`"):
        reference(nn.Linear(2, 2))


@pytest.mark.parametrize("config, detail", [({"depth": "six"}, "TypeError|str"), ({"bogus": 1}, "bogus"),
                                            ({**DIGITS, "name": "DiT-Q/2"}, "unknown model")])
def test_configs_the_class_rejects_are_user_errors(config, detail):
    with pytest.raises(UserError, match=f"^art/quant_config.json: cannot build vq4dit.models.dit.DiT from its config .*"
                                        f"({detail})"):
        build_skeleton({"class": "vq4dit.models.dit.DiT", "config": config}, source="art/quant_config.json")


def test_init_functions_skip_meta_tensors_only():
    """Buffers a model initialises in __init__ keep their values; only meta parameters go uninitialised."""
    real = torch.zeros(1000)
    with parameters_on_meta():
        nn.init.normal_(real)
        nn.init.normal_(torch.empty(3, device="meta"))
    assert real.std() > 0.5


def test_meta_patch_is_undone_even_on_error():
    register, normal = nn.Module.register_parameter, nn.init.normal_
    with pytest.raises(RuntimeError), parameters_on_meta():
        assert nn.Linear(3, 3).weight.is_meta
        raise RuntimeError
    assert nn.Module.register_parameter is register and nn.init.normal_ is normal
    assert not nn.Linear(3, 3).weight.is_meta


def test_an_artifact_written_before_the_package_layout_still_names_its_model():
    """Artifacts from before the modules moved under vq4dit/ name the DiT as models.dit.DiT (mutation: the legacy
    prefix not mapped -> refused as untrusted)."""
    from vq4dit.models.dit import DiT

    assert model_class({"class": "models.dit.DiT", "config": {}}) is DiT
