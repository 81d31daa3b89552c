"""torchvision architectures, with the stem adapted to small inputs; dropout, partial init, frozen backbone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision import models

from .errors import BuilderError
from .train_config import ARCHITECTURES

# Below this input side the ImageNet stem (stride-2 conv + max pool) throws away most of the image.
SMALL_INPUT = 96


class DropoutLinear(nn.Linear):
    """A Linear layer with dropout on its input. Its parameters keep the plain Linear's names, so
    checkpoints load into a model built without dropout (which is what eval does anyway)."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def create_model(
    arch: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224, dropout: float | None = None
) -> nn.Module:
    """An untrained torchvision classifier for `in_channels` x `image_size` x `image_size` inputs.

    `dropout`: probability of dropping the features entering the classifier (None: the architecture's
    default, 0 for ResNets and 0.2 for MobileNetV3).
    """
    if arch not in ARCHITECTURES:
        raise BuilderError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise BuilderError(f"dropout {dropout} must be in [0, 1)")
    extra = {"dropout": dropout} if dropout is not None and arch.startswith("mobilenet") else {}
    model = getattr(models, arch)(weights=None, num_classes=num_classes, **extra)
    if dropout and arch.startswith("resnet"):
        model.fc = DropoutLinear(model.fc.in_features, num_classes, dropout)
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
            model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1 if small else 2, 1, bias=False)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: str = "cpu") -> None:
    """Recompute every BatchNorm's running mean and variance from `loader`'s images (precise BN).

    The running statistics are what eval mode normalizes with. Kept as moving averages that start at
    mean 0, variance 1 and move by `momentum` per step (0.01 in torchvision's MobileNetV3, 0.1 elsewhere),
    they still mostly hold that start after the few dozen steps of a small dataset, while MobileNetV3's
    activations have variances far below 1 (its depthwise kernels start small). Eval mode then shrinks
    the signal at every layer until every image gets the same answer.
    """
    torch.optim.swa_utils.update_bn(loader, model, device=torch.device(device))


def count_macs_and_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates and parameters of one forward pass at batch 1."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(macs), int(params)


def default_dropout(arch: str) -> float:
    return 0.2 if arch.startswith("mobilenet") else 0.0


def classifier(model: nn.Module) -> nn.Module:
    """The classification head: ResNet's `fc`, MobileNetV3's `classifier` (two Linear layers)."""
    head = model.fc if hasattr(model, "fc") else getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise BuilderError(f"{type(model).__name__} has no `fc` or `classifier` head")
    return head


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Stop gradients everywhere but the classifier; returns the parameters left to train.

    The training loop must also keep the backbone in eval mode (`backbone_eval`), or its BatchNorm
    running statistics would still move.
    """
    head_parameters = {id(p) for p in classifier(model).parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in head_parameters)
    return [p for p in model.parameters() if p.requires_grad]


def backbone_eval(model: nn.Module) -> None:
    """Everything in eval mode (BatchNorm statistics fixed) except the classifier (its dropout stays on)."""
    model.eval()
    classifier(model).train()


@dataclass
class InitReport:
    path: str
    loaded: int
    skipped: list[str] = field(default_factory=list)  # "name: why"

    def to_dict(self) -> dict:
        return {"path": self.path, "loaded": self.loaded, "skipped": self.skipped}


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "") -> InitReport:
    """Copy every tensor of `state` whose name and shape match `model`; report what was left out."""
    own = model.state_dict()
    matched, skipped = {}, []
    for name, tensor in state.items():
        if name not in own:
            skipped.append(f"{name}: not in this model")
        elif own[name].shape != tensor.shape:
            skipped.append(f"{name}: shape {tuple(tensor.shape)} != {tuple(own[name].shape)}")
        else:
            matched[name] = tensor
    model.load_state_dict(matched, strict=False)
    return InitReport(path=source, loaded=len(matched), skipped=skipped)
