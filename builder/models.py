"""torchvision architectures, with the stem adapted to small inputs; dropout, partial init, frozen backbone;
torchvision's published weights."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from .errors import BuilderError, error_line
from .train_config import ARCHITECTURES

log = logging.getLogger(__name__)

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


# ---- torchvision's published weights (`--pretrained`) ----


def pretrained_weights(arch: str, name: str = "DEFAULT"):
    """torchvision's weights enum member for `arch`: `DEFAULT` (its best published weights) or a member name
    such as IMAGENET1K_V1. BuilderError for an architecture without published weights or an unknown name."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:  # torchvision's answer for a builder it has no weights enum for
        raise BuilderError(f"--pretrained: architecture {arch!r} has no published torchvision weights") from e
    names = [member.name for member in enum]
    if not names:
        raise BuilderError(f"--pretrained: architecture {arch!r} has no published torchvision weights")
    try:
        return enum[name]
    except KeyError:
        raise BuilderError(
            f"--pretrained: {enum.__name__} has no {name!r}; choose DEFAULT or one of {', '.join(names)}"
        ) from None


def weights_name(weights) -> str:
    """`ResNet18_Weights.IMAGENET1K_V1`: what a run records as its starting point."""
    return f"{type(weights).__name__}.{weights.name}"


def weights_cache_file(weights) -> Path:
    """Where torch.hub keeps the weights' file: `$TORCH_HOME/hub/checkpoints/<the URL's file name>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def fetch_pretrained(weights) -> dict[str, torch.Tensor]:
    """The weights' state dict, downloaded with a progress bar on first use into the torch.hub cache.

    torch.hub checks the SHA-256 prefix in the file name while it downloads; a file already in the cache is
    read as it is (so one placed there by hand loads without the check). Offline and not cached: one line
    naming the file to place in the cache."""
    cached = weights_cache_file(weights)
    try:
        # weights_only: a file in the cache is only ever tensors; anything else is refused, not run.
        state = weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except (URLError, OSError) as e:  # no network (URLError is an OSError), refused, or an unwritable cache
        reason = getattr(e, "reason", None) or e.strerror or e
        raise BuilderError(
            f"--pretrained: cannot download {weights_name(weights)} from {weights.url} ({reason}); "
            f"without network access, place that file at {cached}"
        ) from e
    except RuntimeError as e:  # torch.hub's hash mismatch, or a cached file torch cannot read
        raise BuilderError(f"--pretrained: {weights_name(weights)} ({cached}): {error_line(e)}") from e
    except pickle.UnpicklingError as e:
        raise BuilderError(f"--pretrained: {cached} is not a state dict torch loads safely: {error_line(e)}") from e
    if not isinstance(state, Mapping):
        raise BuilderError(f"--pretrained: {cached} holds no state dict")
    return dict(state)


def weights_preprocess(weights) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """(crop, resize, mean, std) of the weights' own eval transform (ImageNet's: 224 of 256, its mean/std)."""
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return int(crop), int(resize), tuple(map(float, transform.mean)), tuple(map(float, transform.std))


def load_pretrained(model: nn.Module, weights, state: Mapping[str, torch.Tensor]) -> InitReport:
    """Load published weights into `model`, all but the last Linear layer (the head, replaced for the
    dataset's classes even when their count is ImageNet's 1000).

    Tensors whose shape the builder changed (the stem of a model for inputs under SMALL_INPUT pixels, a
    first layer for grayscale) stay as initialized and are reported as skipped."""
    head = [name for name, module in classifier(model).named_modules() if isinstance(module, nn.Linear)][-1]
    prefix = "fc." if hasattr(model, "fc") else "classifier."
    head_prefix = prefix + head + "." if head else prefix
    backbone = {name: tensor for name, tensor in state.items() if not name.startswith(head_prefix)}
    report = load_matching(model, backbone, source=weights_name(weights))
    if report.loaded == 0:
        raise BuilderError(f"--pretrained: no tensor of {weights_name(weights)} fits this {type(model).__name__}")
    log.info(
        "pretrained %s: %d tensors loaded, classifier replaced%s",
        report.path,
        report.loaded,
        f", {len(report.skipped)} skipped ({', '.join(s.split(':')[0] for s in report.skipped[:6])})"
        if report.skipped
        else "",
    )
    return report


def parameter_groups(model: nn.Module, *, lr: float, backbone_scale: float) -> list[dict]:
    """Two optimizer groups: the classifier at `lr`, first (the `lr` a run reports), and the backbone at
    `lr * backbone_scale` (a pretrained backbone is moved less than a fresh head)."""
    head_ids = {id(p) for p in classifier(model).parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_scale}]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) everything but the classifier, whose parameters always train."""
    if trainable:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        freeze_backbone(model)
