"""utils/errors.py: the one-line detail of an exception inside a UserError."""
import pytest

from vq4dit.utils.errors import error_detail


@pytest.mark.parametrize("error, detail", [
    (RuntimeError("Error(s) in loading state_dict for QwenImageTransformer2DModel:\n\tsize mismatch for "
                  "a.weight: copying a param with shape (4, 8)\n\tsize mismatch for b.weight"),
     "Error(s) in loading state_dict for QwenImageTransformer2DModel: size mismatch for a.weight: copying a param "
     "with shape (4, 8)"),
    (OSError("no such file\nsecond line"), "no such file"),
    (ValueError(""), "ValueError"),
    (KeyError("x"), "'x'"),
])
def test_the_detail_is_the_first_line_and_what_it_introduces(error, detail):
    """A LoRA of another model said only "cannot load it onto the QwenImagePipeline transformer (Error(s) in loading
    state_dict for QwenImageTransformer2DModel:)" (mutation: the first line alone)."""
    assert error_detail(error) == detail
