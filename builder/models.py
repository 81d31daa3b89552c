"""torchvision architectures, with the stem adapted to small inputs."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from .errors import BuilderError

ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
# Below this input side the ImageNet stem (stride-2 conv + max pool) throws away most of the image.
SMALL_INPUT = 96


def create_model(arch: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """An untrained torchvision classifier for `in_channels` x `image_size` x `image_size` inputs."""
    if arch not in ARCHITECTURES:
        raise BuilderError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = getattr(models, arch)(weights=None, num_classes=num_classes)
    small = image_size < SMALL_INPUT
    if arch.startswith("resnet"):
        if small or in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if small else (7, 2, 3)
            model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding, bias=False)
        if small:
            model.maxpool = nn.Identity()
    else:
        first = model.features[0][0]
        if small or in_channels != 3:
            model.features[0][0] = nn.Conv2d(
                in_channels, first.out_channels, 3, 1 if small else 2, 1, bias=False
            )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(batch)
