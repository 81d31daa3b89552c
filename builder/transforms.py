"""Image transforms: the eval preset (exactly what the gateway does), the training presets, and the image
batches the stages draw through the eval transform (calibration, validation/parity)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from server.preprocess import PreprocessSpec, normalize, preprocess, to_model_pixels

from .data import ImageDataset
from .errors import QuantizeError, TrainError
from .train_config import AUGMENT_PRESETS


class EvalTransform:
    """The exact transform the gateway applies, as a torch tensor (C, H, W float32)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, self.spec))


class TrainTransform:
    """Augmentation on the model-sized image (after the eval geometry and equalization), then the eval
    normalization, so train and eval inputs share scale and statistics.

    none: the eval transform. light: small affine jitter (rotation 10 deg, shift 8%, scale 0.9-1.1).
    strong: random resized crop (50-100% of the area), rotation 15 deg, brightness/contrast jitter (and
    saturation/hue for color images), random erasing (p 0.25). Horizontal flips (light and strong) only
    where `flip` is set: datasets whose classes survive mirroring (shapes, photos), not digits.
    """

    def __init__(self, spec: PreprocessSpec, augment: str = "light", *, flip: bool = False) -> None:
        if augment not in AUGMENT_PRESETS:
            raise TrainError(f"augment {augment!r} is not one of {', '.join(AUGMENT_PRESETS)}")
        color = spec.channels == 3
        ops: list = []
        if augment == "light":
            ops.append(v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)))
        elif augment == "strong":
            ops += [
                v2.RandomResizedCrop(spec.image_size, scale=(0.5, 1.0), antialias=True),
                v2.RandomRotation(15),
                v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3 if color else 0, hue=0.05 if color else 0),
            ]
        if flip and augment != "none":
            ops.append(v2.RandomHorizontalFlip())
        self.spec = spec
        self.geometry = v2.Compose(ops) if ops else None
        self.erase = v2.RandomErasing(p=0.25, value=0) if augment == "strong" else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = to_model_pixels(image, self.spec)
        if self.geometry is not None:
            pixels = self.geometry(pixels)
        tensor = torch.from_numpy(normalize(np.asarray(pixels), self.spec))
        return self.erase(tensor) if self.erase is not None else tensor


def eval_transform(spec: PreprocessSpec) -> EvalTransform:
    return EvalTransform(spec)


def train_transform(spec: PreprocessSpec, augment: str = "light", *, flip: bool = False) -> TrainTransform:
    """The training transform for `spec` (`light`, no flips: what prune and QAT fine-tune with)."""
    return TrainTransform(spec, augment, flip=flip)


def validation_images(spec: PreprocessSpec, dataset: ImageDataset, count: int) -> torch.Tensor:
    """The first `count` validation images through the eval transform: the batch on which an exported
    file must agree with PyTorch."""
    transform = EvalTransform(spec)
    count = min(count, len(dataset.val))
    return torch.stack([transform(dataset.val.image(i, dataset.color_mode)) for i in range(count)])


def calibration_images(dataset: ImageDataset, spec: PreprocessSpec, count: int, *, seed: int = 0) -> np.ndarray:
    """`count` training images, drawn without replacement, through the eval transform (NCHW float32)."""
    available = len(dataset.train)
    if available < count:
        raise QuantizeError(
            f"asked for {count} calibration images but the training split of "
            f"{dataset.name!r} has only {available}; lower --calibration-images"
        )
    chosen = np.random.default_rng(seed).choice(available, size=count, replace=False)
    transform = EvalTransform(spec)
    return np.stack([transform(dataset.train.image(int(i), dataset.color_mode)).numpy() for i in sorted(chosen)])
