"""The model card of an artifact: README.md with the hub's YAML metadata, so that uploading the directory
(`hf upload owner/name ARTIFACT_DIR`) publishes a model repo that says what it is and how to load it.

Front matter: base_model (the pipeline's hub id, when the artifact records one) with base_model_relation
"quantized", library_name, tags, and a `quantization` block (method, bits per weight with and without codebooks,
the number of quantized layers, the resolved config). The body shows how to load it with vq4dit.load_transformer.
The card is derived from what the artifact records; model.safetensors and quant_config.json do not depend on it.
"""
import re
from collections import Counter

import yaml

from vq4dit.utils.hubid import HUB_ID
from vq4dit.vq.allocate import Setting

# layer class -> the quantization method's name
METHODS = {"VQLinear": "vq4dit", "ResidualVQLinear": "vq4dit", "RTNLinear": "rtn"}
_CACHED_REPO = re.compile(r"models--([^/\\]+?)--([^/\\]+)")  # huggingface_hub's cache folder of owner/name
CARD_FILE = "README.md"


def hub_id_of(source):
    """The hub repo id a pipeline source names: the id itself, or the repo of a huggingface_hub cache snapshot path;
    None for any other local path."""
    if not isinstance(source, str):
        return None
    if HUB_ID.fullmatch(source):
        return source
    cached = _CACHED_REPO.search(source)
    return f"{cached[1]}/{cached[2]}" if cached else None


def weighted_bits(layers, key):
    """Bits per weight over all quantized layers, each weighted by its number of weights."""
    sizes = {name: e["in_features"] * e["out_features"] for name, e in layers.items()}
    return sum(layers[n][key] * s for n, s in sizes.items()) / max(sum(sizes.values()), 1)


def base_name(ref, config):
    """The model the artifact quantizes, as a reader knows it: a diffusers transformer's pipeline (its hub id, else
    its directory), else the project DiT's registry name (config `model`, which a pipeline's config.yaml leaves
    out: a pipeline does not use it)."""
    source = (ref.get("pipeline") or {}).get("source")
    if source is not None:
        return hub_id_of(source) or str(source)
    return dict(config).get("model") or ref["class"].rsplit(".", 1)[-1]


def front_matter(ref, layers, config):
    short = ref["class"].rsplit(".", 1)[-1]
    # the run's --method where the config says it (kmeans and codebook build the same layer class as vq4dit)
    methods = [config["method"]] if dict(config).get("method") else sorted({METHODS.get(e["class"], e["class"])
                                                                            for e in layers.values()})
    base = hub_id_of((ref.get("pipeline") or {}).get("source"))
    named = "model" in config or ref.get("pipeline")  # a pipeline's config.yaml leaves the DiT name out
    config = {**dict(config), "model": base_name(ref, config)} if named else dict(config)
    meta = {"base_model": base, "base_model_relation": "quantized"} if base else {}
    meta["library_name"] = "diffusers" if ref["class"].startswith("diffusers.") else "vq4dit"
    meta["tags"] = list(dict.fromkeys(["vq4dit", "quantized", *methods, short]))  # the method may be "vq4dit"
    meta["quantization"] = {
        "method": "+".join(methods),
        "bits_per_weight": round(weighted_bits(layers, "bits_per_weight"), 4),
        "bits_per_weight_with_codebook": round(weighted_bits(layers, "bits_per_weight_with_codebook"), 4),
        "quantized_layers": len(layers), "config": config}
    return meta


def usage(ref):
    """The Python that loads the artifact: into its diffusers pipeline, or the project's DiT for sample.py."""
    pipeline = ref.get("pipeline") or {}
    if "class" not in pipeline:
        return ("from vq4dit import load_transformer\n\n"
                "model = load_transformer(\"owner/name\")  # this repo's id, or the artifact directory\n"
                "# sample: python sample.py --quantized owner/name --out samples\n")
    base = hub_id_of(pipeline.get("source")) or pipeline.get("source")
    return ("import torch\n"
            f"from diffusers import {pipeline['class']}\n"
            "from vq4dit import load_transformer\n\n"
            "transformer = load_transformer(\"owner/name\", device=\"cuda\", dtype=torch.bfloat16)  # this repo's id\n"
            f"pipe = {pipeline['class']}.from_pretrained(\n"
            f"    \"{base}\", transformer=transformer, torch_dtype=torch.bfloat16).to(\"cuda\")\n"
            "image = pipe(\"a photo of a cat\").images[0]\n"
            "# LoRAs stay a separate full-precision branch: pipe.load_lora_weights(...) works, fuse_lora is refused\n")


def allocation_text(layers, config):
    """The card's paragraph on a --bits allocation (how many layers got each k, d), or "" for a uniform run."""
    if config.get("bits") is None:
        return ""
    counts = Counter(Setting(e["k"], e["d"], e.get("stages", 1)) for e in layers.values())
    parts = ", ".join(f"{n} x {s}" for s, n in sorted(counts.items(), key=lambda i: (-i[0].bits, i[0].d)))
    return (f"Bit allocation (`--bits {config['bits']:g}`): {parts}, chosen per layer to minimise the estimated "
            f"prediction error; {weighted_bits(layers, 'bits_per_weight'):.4f} index bits per weight on average "
            "(per-layer settings in `quant_config.json`).\n\n")


def model_card(ref, layers, config):
    """README.md text for an artifact of model reference `ref`, quant_config layer entries `layers` and the
    resolved quantization config."""
    meta = front_matter(ref, layers, config)
    q = meta["quantization"]
    short = ref["class"].rsplit(".", 1)[-1]
    title = f"{base_name(ref, config)} ({short})" if ref.get("pipeline") else short
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
            f"# {title}, quantized ({q['method']}, {q['bits_per_weight']:g} "
            f"bit{'' if q['bits_per_weight'] == 1 else 's'} per weight)\n\n"
            f"{q['quantized_layers']} linear layers of the transformer are quantized "
            f"({q['bits_per_weight_with_codebook']:g} bits per weight with codebooks); everything else is kept in "
            "full precision. Made with vq4dit (post-training vector quantization of diffusion transformers, "
            "VQ4DiT). `model.safetensors` holds the packed tensors, `quant_config.json` their layout and sha256 "
            "digests (checked on load), `config.yaml` the resolved quantization config (also in the metadata "
            "above).\n\n"
            f"{allocation_text(layers, config)}"
            f"## Load\n\n```python\n{usage(ref)}```\n\n"
            "## Publish\n\n```bash\nhf upload owner/name ARTIFACT_DIR\n```\n")

