"""Every transformer class the installed diffusers exports, built on the meta device from its defaults: does the
generic adapter (models/adapters/generic.py) find its blocks? docs/families.md holds the table; regenerate it with
`python -m tests.models.test_generic_classes` after a diffusers upgrade (the test fails while it is stale).

Only the structure is checked here (block lists as declared); the call order, the teacher and sampling are tested
end to end on tiny pipelines (tests/jobs/test_quantize_generic.py).
"""
import functools
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

from vq4dit.models.adapters import ADAPTERS
from vq4dit.models.adapters.generic import block_lists

pytest.importorskip("diffusers")
LAYER_COUNT = re.compile(r"^(num_|n_)?(\w+_)?(layers|blocks|depth)$")
DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"
# the defaults of these classes leave required sizes unset: the smallest arguments that build them
ARGUMENTS = {
    "DreamLiteTransformer2DModel": dict(in_channels=32),
    "EasyAnimateTransformer3DModel": dict(in_channels=16, patch_size=2, sample_width=64, sample_height=64),
    "HiDreamImageTransformer2DModel": dict(in_channels=16, llama_layers=list(range(48)), caption_channels=[32, 32],
                                           text_emb_dim=32),
    "OmniGenTransformer2DModel": dict(rope_scaling={"long_factor": [1.0] * 48, "short_factor": [1.0] * 48}),
    "LatteTransformer3DModel": dict(in_channels=4, sample_size=32, patch_size=2, caption_channels=32, video_length=4,
                                    num_embeds_ada_norm=1000, norm_type="ada_norm_single"),
    "Transformer2DModel": dict(in_channels=4, patch_size=2, sample_size=32, norm_type="ada_norm_zero",
                               num_embeds_ada_norm=1000),
    "TransformerTemporalModel": dict(in_channels=32),
    "WanVACETransformer3DModel": dict(vace_layers=[0, 1]),
}
TESTED = {  # families quantized, saved, loaded and sampled on tiny pipelines by the test suite
    "SanaTransformer2DModel": "SANA", "QwenImageTransformer2DModel": "Qwen-Image", "ChromaTransformer2DModel": "Chroma",
    "ZImageTransformer2DModel": "Z-Image", "WanTransformer3DModel": "Wan (video)",
    "CogVideoXTransformer3DModel": "CogVideoX (video)", "PixArtTransformer2DModel": "PixArt (dedicated)",
    "SD3Transformer2DModel": "SD3 (dedicated)", "FluxTransformer2DModel": "Flux.1 (dedicated)",
    "DiTTransformer2DModel": "DiT (dedicated)",
}
# every class whose blocks the adapter found when this list was written: a regression in the block finder fails
FOUND = [
    "AceStepTransformer1DModel", "AllegroTransformer3DModel", "AnyFlowFARTransformer3DModel",
    "AnyFlowTransformer3DModel", "AuraFlowTransformer2DModel", "BriaFibo2Transformer2DModel",
    "BriaFiboTransformer2DModel", "BriaTransformer2DModel", "ChromaTransformer2DModel",
    "ChronoEditTransformer3DModel", "CogVideoXTransformer3DModel", "CogView3PlusTransformer2DModel",
    "CogView4Transformer2DModel", "ConsisIDTransformer3DModel", "Cosmos3OmniTransformer", "CosmosTransformer3DModel",
    "DiTTransformer2DModel", "DreamLiteTransformer2DModel", "ErnieImageTransformer2DModel",
    "Flux2Transformer2DModel", "Flux3Transformer2DModel", "FluxTransformer2DModel", "GlmImageTransformer2DModel",
    "HeliosTransformer3DModel", "HunyuanImageTransformer2DModel", "HunyuanVideo15Transformer3DModel",
    "HunyuanVideoFramepackTransformer3DModel", "HunyuanVideoTransformer3DModel", "Ideogram4Transformer2DModel",
    "JoyImageEditPlusTransformer3DModel", "JoyImageEditTransformer3DModel", "Kandinsky5Transformer3DModel",
    "Kandinsky6SRTransformer3DModel", "Kandinsky6Transformer3DModel", "Krea2Transformer2DModel",
    "LTX2VideoTransformer3DModel", "LTXVideoTransformer3DModel", "LatteTransformer3DModel",
    "LongCatAudioDiTTransformer", "LongCatImageTransformer2DModel", "Lumina2Transformer2DModel",
    "MiniMaxH3Transformer3DModel", "MiniMaxMusic3Transformer1DModel", "MochiTransformer3DModel",
    "MotifVideoTransformer3DModel", "NucleusMoEImageTransformer2DModel", "OmniGenTransformer2DModel",
    "OvisImageTransformer2DModel", "PRXTransformer2DModel", "PixArtTransformer2DModel", "PriorTransformer",
    "QwenImage21Transformer2DModel", "QwenImageTransformer2DModel", "RFD4ProteinaTransformer",
    "SD3Transformer2DModel", "SanaTransformer2DModel", "SanaVideoTransformer3DModel",
    "SanaWMLTX2RefinerTransformer3DModel", "SanaWMTransformer3DModel", "SkyReelsV2Transformer3DModel",
    "Transformer2DModel", "TransformerTemporalModel", "WanAnimate2Transformer3DModel",
    "WanAnimateTransformer3DModel", "WanTransformer3DModel", "WanVACETransformer3DModel", "ZImageTransformer2DModel",
]


def transformer_classes():
    """Names of the model classes diffusers exports whose name says transformer (e.g. WanTransformer3DModel)."""
    import diffusers

    names = [n for n in dir(diffusers) if re.search(r"Transformer(\w*Model|$)", n)]
    return sorted(n for n in names if isinstance(getattr(diffusers, n), type)
                  and issubclass(getattr(diffusers, n), diffusers.ModelMixin))


def scaled_down(cls):
    """Constructor arguments of `cls` that cut its layer counts to 2 (construction time is per layer, even on meta)."""
    out = {}
    for key, parameter in inspect.signature(cls.__init__).parameters.items():
        if LAYER_COUNT.search(key) and isinstance(parameter.default, int) and not isinstance(parameter.default, bool) \
                and parameter.default > 2:
            out[key] = 2
    return out


@functools.cache
def walk(name):
    """(status, detail) of class `name`: found with its block lists, not found, or not buildable and why."""
    import diffusers

    cls = getattr(diffusers, name)
    try:
        with torch.device("meta"):
            model = cls(**{**scaled_down(cls), **ARGUMENTS.get(name, {})})
    except Exception as e:  # any constructor failure is a row of the table, not an error of the walk
        return "not buildable from defaults", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    lists = block_lists(model)
    if not lists:
        return "not found", "no ModuleList of repeated blocks among its children"
    return "found", ", ".join(f"{name} x{len(items)} ({type(items[0]).__name__})" for name, items in lists)


def table():
    import diffusers

    rows = ["| class | blocks | lists (as declared; the pipeline probe orders them as called) | adapter | tested |",
            "|---|---|---|---|---|"]
    for name in transformer_classes():
        status, detail = walk(name)
        adapter = "dedicated" if name in ADAPTERS else "generic"
        rows.append(f"| {name} | {status} | {detail} | {adapter} | {TESTED.get(name, '')} |")
    return (f"Transformer classes of diffusers {diffusers.__version__}, built on the meta device from their defaults, "
            "layer counts cut to 2 (a few need sizes: tests/models/test_generic_classes.py ARGUMENTS).\n\n"
            + "\n".join(rows) + "\n")


def test_the_generic_adapter_finds_the_blocks_of_every_known_class():
    names = transformer_classes()
    assert len(names) >= 60  # the walk sees diffusers' exports, not an empty list
    rows = {name: walk(name) for name in FOUND}
    assert {name: row for name, row in rows.items() if row[0] != "found"} == {}


def test_docs_families_table_is_current():
    assert DOC.read_text().split("\n## Every transformer class\n\n", 1)[1].rstrip() == table().rstrip(), \
        "docs/families.md is stale: python -m tests.models.test_generic_classes"


if __name__ == "__main__":
    head, _ = DOC.read_text().split("\n## Every transformer class\n\n", 1)
    DOC.write_text(f"{head}\n## Every transformer class\n\n{table()}")
    sys.exit(0)
