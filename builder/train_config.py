"""The training recipe's settings (`TrainConfig`), checked when made, and the names of its choices.

Torch-free, so that the command line can list the choices and defaults in its help, and parse flags,
without importing torch; `builder.train` runs the recipe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PublishError, TrainError

if TYPE_CHECKING:
    from server.preprocess import PreprocessSpec

ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
LOSSES = ("ce", "focal")
SCHEDULES = ("cosine", "step", "onecycle")
AUGMENT_PRESETS = ("none", "light", "strong")
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "on", "off")
# `strong` turns batch mixing on unless --cutmix/--mixup say otherwise (timm's usual alphas).
STRONG_CUTMIX_ALPHA = 1.0
STRONG_MIXUP_ALPHA = 0.2
# The fine-tuning recipe of --pretrained: the new classifier is trained alone for the first epoch (random
# head gradients would otherwise disturb the pretrained features), then everything trains, the backbone
# at a tenth of the classifier's learning rate.
PRETRAINED_FREEZE_EPOCHS = 1
PRETRAINED_BACKBONE_LR_SCALE = 0.1


@dataclass
class TrainConfig:
    dataset: str = "digits"  # digits | shapes[:options] | folder
    arch: str = "resnet18"
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    image_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("runs/latest"))
    # model
    dropout: float | None = None  # before the classifier; None: the architecture's default
    init: str | None = None  # checkpoint of this builder to start from
    freeze_backbone: bool = False  # train the classifier only
    # torchvision's published weights to start from: DEFAULT or a member of the architecture's weights
    # enum (IMAGENET1K_V1...). Also makes the weights' eval preprocessing the default (input size, resize,
    # mean and std) and turns on the fine-tuning recipe below.
    pretrained: str | None = None
    freeze_epochs: int | None = None  # first epochs with the backbone frozen; None: 1 if pretrained, else 0
    backbone_lr_scale: float | None = None  # backbone lr / classifier lr; None: 0.1 if pretrained, else 1
    # preprocessing (recorded in the PreprocessSpec the gateway applies)
    mean: tuple[float, ...] | None = None  # None: measured on the training split
    std: tuple[float, ...] | None = None
    equalize: bool = False
    # augmentation
    augment: str = "light"  # none | light | strong
    cutmix: float | None = None  # CutMix alpha; None: 1.0 with augment=strong, else off
    mixup: float | None = None  # MixUp alpha; None: 0.2 with augment=strong, else off
    # loss
    loss: str = "ce"  # ce | focal
    class_weights: str = "none"  # none | auto | w1,w2,...
    # First epoch trained with the class weights. Later than 1 defers re-weighting until the features are
    # learned from every image at equal weight (deferred re-weighting, Cao et al. 2019).
    class_weights_start: int = 1
    focal_gamma: float = 2.0
    # optimization
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # cosine | step | onecycle
    step_size: int = 2  # epochs between decays (schedule=step)
    gamma: float = 0.1  # decay factor (schedule=step)
    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max gradient norm
    amp: str = "auto"  # mixed precision: auto (on CUDA), on (needs CUDA), off
    # run
    patience: int | None = None  # stop after this many epochs without a better val accuracy
    resume: bool = False  # continue from out_dir/last.pt
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        self._check_choices()
        self._check_ranges()

    def _check_choices(self) -> None:
        for name, choices in (
            ("arch", ARCHITECTURES),
            ("augment", AUGMENT_PRESETS),
            ("loss", LOSSES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("amp", AMP_MODES),
        ):
            if getattr(self, name) not in choices:
                raise TrainError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")

    def _check_ranges(self) -> None:
        problems = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.accum_steps >= 1, "accum_steps must be at least 1"),
            (self.step_size >= 1, "step_size must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 < self.val_fraction < 1, "val_fraction must be between 0 and 1"),
            (self.dropout is None or 0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.cutmix is None or self.cutmix >= 0, "cutmix alpha must be >= 0 (0: off)"),
            (self.mixup is None or self.mixup >= 0, "mixup alpha must be >= 0 (0: off)"),
            (self.focal_gamma >= 0, "focal_gamma must be >= 0"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be positive"),
            (self.patience is None or self.patience >= 1, "patience must be at least 1"),
            (self.class_weights_start >= 1, "class_weights_start must be at least 1"),
            (self.image_size is None or self.image_size >= 1, "image_size must be at least 1"),
            (self.freeze_epochs is None or self.freeze_epochs >= 0, "freeze_epochs must be >= 0"),
            (self.backbone_lr_scale is None or self.backbone_lr_scale > 0, "backbone_lr_scale must be positive"),
            (not (self.pretrained and self.init), "pretrained and init both choose the starting weights: give one"),
        ]
        for ok, message in problems:
            if not ok:
                raise TrainError(message)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data

    def fine_tuning(self) -> tuple[int, float]:
        """(epochs with the backbone frozen, backbone lr / classifier lr), the pretrained defaults filled in."""
        freeze = (
            self.freeze_epochs
            if self.freeze_epochs is not None
            else (PRETRAINED_FREEZE_EPOCHS if self.pretrained else 0)
        )
        scale = (
            self.backbone_lr_scale
            if self.backbone_lr_scale is not None
            else (PRETRAINED_BACKBONE_LR_SCALE if self.pretrained else 1.0)
        )
        return freeze, scale

    def mixing_alphas(self) -> tuple[float, float]:
        """(CutMix alpha, MixUp alpha), the preset's defaults filled in."""
        strong = self.augment == "strong"
        cutmix = self.cutmix if self.cutmix is not None else (STRONG_CUTMIX_ALPHA if strong else 0.0)
        mixup = self.mixup if self.mixup is not None else (STRONG_MIXUP_ALPHA if strong else 0.0)
        return cutmix, mixup


# ---- parameters from `builder tune` ----

# Where and how one run is kept, not how it trains: a recorded base never sets them.
RUN_FIELDS = ("out_dir", "resume", "tensorboard")


def dataset_recipe(config: Mapping) -> dict:
    """The dataset source and split of a run's settings (`TrainConfig.to_dict()`; defaults: TrainConfig's)."""
    return {
        "source": config.get("dataset", "digits"),
        "val_fraction": config.get("val_fraction", 0.2),
        "seed": config.get("seed", 0),
    }


def load_params(path: Path) -> dict:
    """Training settings from a JSON file (tune's `best.json`, or a flat {field: value} object), merged."""
    merged: dict = {}
    for _, settings in load_param_layers(path):
        merged.update(settings)
    return merged


def load_param_layers(path: Path) -> list[tuple[str, dict]]:
    """Training settings from a JSON file, as (source, settings) layers, the one that wins last.

    tune's `best.json` gives two: the base settings the study ran with (dataset, image size, architecture,
    epochs, ...; not where that run was kept) and the tuned `params`. Any other object is one layer of
    {field: value}.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise TrainError(f"params file {path} cannot be read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise TrainError(f"params file {path} is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise TrainError(f"params file {path} must hold an object of training settings")
    if "params" not in data:
        return [(path.name, _checked(path, data, ()))]
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise TrainError(f"params file {path}: 'base' must be an object of training settings")
    return [
        (f"{path.name} base", _checked(path, base, RUN_FIELDS)),
        (f"{path.name} params", _checked(path, data["params"], ())),
    ]


def _checked(path: Path, settings, ignored: tuple[str, ...]) -> dict:
    if not isinstance(settings, dict):
        raise TrainError(f"params file {path} must hold an object of training settings")
    settings = {k: v for k, v in settings.items() if k not in ignored}
    valid = {f.name for f in fields(TrainConfig)} - {"out_dir", "resume"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise TrainError(
            f"params file {path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return settings


def describe_sources(layers: list[tuple[str, dict]]) -> list[str]:
    """One line per source, the winning one first, naming the settings it decided; settings a later layer
    overrides, and recorded values equal to the default, are left out."""
    defaults = TrainConfig().to_dict()
    decided: dict[str, str] = {}
    for source, settings in layers:
        decided.update(dict.fromkeys(settings, source))
    lines = []
    for source, settings in reversed(layers):
        shown = [
            f"{k}={v}"
            for k, v in settings.items()
            if decided[k] == source and (source == layers[-1][0] or v != defaults.get(k))
        ]
        if shown:
            lines.append(f"  {source}: {', '.join(shown)}")
    return lines + ["  defaults: everything else"]


# ---- preprocessing of a model trained elsewhere ----

# What a model that carries no preprocessing spec is taken to expect: ImageNet's center crop and statistics.
IMAGENET_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The resize before the crop is crop / 0.875 (256 for 224), torchvision's reference eval ratio.
CROP_FRACTION = 0.875


def serving_preprocess(
    carried: Mapping[str, Any] | None,
    *,
    resize: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    color_mode: str | None = None,
) -> PreprocessSpec | None:
    """The preprocessing to publish a model with. Values given override the spec the model carries
    (`carried`, from its ONNX metadata) one at a time: a new resize alone must not swap the mean and std
    measured in training for ImageNet's. Without a carried spec, ImageNet's, with a resize of crop / 0.875
    when only the crop is given. None: nothing given, and the carried spec stands as it is."""
    from server.preprocess import PreprocessSpec

    given = (resize, crop, mean, std, color_mode)
    if carried and all(value is None for value in given):
        return None
    base = dict(carried or {})
    crop_size = crop or base.get("image_size") or IMAGENET_CROP
    resize_size = resize or (int(crop_size / CROP_FRACTION) if crop or not base else base["resize_size"])
    try:
        return PreprocessSpec(
            image_size=crop_size,
            resize_size=resize_size,
            mean=tuple(mean or base.get("mean") or IMAGENET_MEAN),
            std=tuple(std or base.get("std") or IMAGENET_STD),
            color_mode=color_mode or base.get("color_mode") or "RGB",
            interpolation=base.get("interpolation", "bilinear"),
            equalize=bool(base.get("equalize", False)),
        )
    except ValueError as e:
        raise PublishError(f"preprocessing flags: {e}") from e
