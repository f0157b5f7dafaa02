"""The generic teacher's prompts encoded up front at one token length (models/adapters/encode_replay.py); the
torchrun side is tested in test_generic_adapter.py."""
import pytest
import torch

from tests.models.tiny_generic import BUILDERS, SIZES
from vq4dit.models.adapters import TeacherPlan
from vq4dit.models.adapters.encode_replay import one_length
from vq4dit.models.adapters.load import load_model
from vq4dit.utils.errors import UserError

pytest.importorskip("transformers")


def _records(*results):
    """records of one encode_prompt call per batch, one batch per result."""
    return [[(f"p{b}", result)] for b, result in enumerate(results)]


def test_token_tensors_are_padded_to_the_longest_batch_and_the_rest_is_left_alone():
    """Embeddings (B, T, D) and an int mask (B, T) padded with zeros; a batch without a mask gets ones; pooled
    float (B, D) with D equal to a T, and the negative's None, untouched. Catches padding the pooled vectors,
    a missing mask left None (the pad tokens then attend), and padding with something other than zeros."""
    short, long = torch.randn(2, 3, 5), torch.randn(1, 5, 5)
    pooled = torch.randn(2, 3)  # D = 3 = the short batch's T
    records = _records((short, None, pooled, None), (long, torch.tensor([[1, 1, 1, 1, 0]]), torch.randn(1, 3), None))
    padded = one_length(records, "Pipe")
    embeds, mask, kept, negative = padded[0][0][1]
    assert embeds.shape == (2, 5, 5) and torch.equal(embeds[:, :3], short) and not embeds[:, 3:].any()
    assert mask.dtype == torch.int64 and mask.tolist() == [[1, 1, 1, 0, 0]] * 2
    assert kept is pooled and negative is None
    assert padded[1][0][1][0] is long and padded[1][0][0] == "p1"


def test_one_length_leaves_equal_lengths_alone_and_refuses_what_it_cannot_mask():
    same = _records((torch.randn(1, 4, 2), None), (torch.randn(2, 4, 2), None))
    assert one_length(same, "Pipe")[0][0][1] is same[0][0][1]
    with pytest.raises(UserError, match="Pipe: the teacher batches' prompts encode to 3 to 4 tokens and its "
                                        "encode_prompt returns no attention mask"):
        one_length(_records((torch.randn(1, 3, 2), None, None), (torch.randn(1, 4, 2), None, None)), "Pipe")


def test_qwen_image_batches_of_other_prompt_lengths_condition_on_one_padded_length(tmp_path):
    """Qwen-Image pads a batch's prompts to its longest, and leaves its mask out when all are valid: two batches of
    one prompt each, 'x' and a long one, reach the transformer at the long one's length, the short one masked
    from its own length on; and the transformer's prediction for the padded call is the unpadded call's (the pad
    tokens are masked). Catches the recording of batches of two lengths (it stopped the run), the mask left out,
    and a pad the transformer sees."""
    directory = str(tmp_path / "qwenimage")
    BUILDERS["qwenimage"]().save_pretrained(directory)
    base = load_model(None, directory)
    adapter = base.adapter
    adapter.bind(base.extra, prompts=["x", "a much longer prompt than the other one"], **SIZES["qwenimage"])
    adapter.blocks(base.model)
    seen = []
    base.model.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    plan = TeacherPlan(num_samples=2, steps=2, cfg_scale=1.0, seed=0, batch_size=1)
    with torch.no_grad():
        for _, run in adapter.teacher_runs(base.model, plan, "cpu"):
            run()
    firsts = seen[-4::2]  # each batch's first step
    lengths = [int(k["encoder_hidden_states_mask"].sum()) for k in firsts]
    longest = max(lengths)
    assert lengths[0] != lengths[1]
    for kwargs, length in zip(firsts, lengths):
        assert kwargs["encoder_hidden_states"].shape[1] == longest
        assert kwargs["encoder_hidden_states_mask"][0].tolist() == [1] * length + [0] * (longest - length)
    kwargs = firsts[lengths.index(min(lengths))]
    unpadded = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :min(lengths)],
                "encoder_hidden_states_mask": None}
    with torch.no_grad():
        padded_out, plain_out = (base.model(**{**k, "return_dict": False})[0] for k in (kwargs, unpadded))
    torch.testing.assert_close(padded_out, plain_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwenimage", "wan"])
def test_text_encoders_stored_in_bf16_compute_what_the_upcast_ones_do_holding_half(family, tmp_path):
    """The generic teacher's text encoders compute in fp32 from their bf16 weights, one layer upcast at a time
    (pipeline_runs.teacher_pipeline): encode_prompt gives the embeddings of the encoder upcast whole, bit for bit,
    while the layers' weights stay bf16 (Qwen2.5-VL, whose dtype the pipeline reads from its first parameter, and
    UMT5). Catches an encoder left in bf16 (other embeddings), and one upcast whole (fp32 layers held)."""
    from vq4dit.models.adapters.pipeline_runs import layer_lists, teacher_pipeline

    pipe = BUILDERS[family]()
    pipe.text_encoder.to(torch.bfloat16)
    directory = str(tmp_path / family)
    pipe.save_pretrained(directory, safe_serialization=True)
    model = load_model(None, directory).model
    held = teacher_pipeline(directory, model)
    whole = teacher_pipeline(directory, model)
    whole.text_encoder.float()  # HostBlocks pins each layer's .float(): upcast whole by hand
    for _, layer in layer_lists(whole.text_encoder):
        for p in layer.parameters():
            p.data = p.data.float()
    prompts = ["a cat", "a much longer prompt about a dog"]
    with torch.no_grad():
        got, want = held.encode_prompt(prompts, device="cpu"), whole.encode_prompt(prompts, device="cpu")
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == w.dtype and torch.equal(g, w)
    layers = layer_lists(held.text_encoder)
    assert layers and {p.dtype for _, layer in layers for p in layer.parameters()} == {torch.bfloat16}
