import pytest
import torch

from facescale.face import to_model_input


@pytest.mark.parametrize("shape", [(5, 3, 112, 112), (1, 3, 16, 16)])  # vector and scalar loops
def test_to_model_input_matches_float64_reference(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    images.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every pixel value
    got = to_model_input(images)
    reference = (images.double() / 255 - 0.5) / 0.5  # arcface_torch: ToTensor, Normalize
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == shape
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=2e-7)
    assert got.min() == -1 and 1 - 2e-7 < got.max() <= 1
