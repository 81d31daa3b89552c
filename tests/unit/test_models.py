"""The classifier architectures as the builder creates them."""

import pytest
import torch

from builder.models import create_model


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_small_inputs_keep_their_resolution_through_the_stem(arch):
    model = create_model(arch, num_classes=4, in_channels=1, image_size=32).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
    first = model.conv1 if arch.startswith("resnet") else model.features[0][0]
    assert first.stride == (1, 1) and first.in_channels == 1
