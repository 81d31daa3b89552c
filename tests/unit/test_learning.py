"""Every architecture `builder train` offers learns a small, plainly separable dataset in a few epochs."""

import json

import numpy as np
import pytest
from PIL import Image

from builder.data import ImageDataset, Split
from builder.train import train
from builder.train_config import ARCHITECTURES, TrainConfig

COLORS = ((230, 40, 40), (40, 230, 40), (40, 40, 230))


def _separable(per_class: int, seed: int, size: int = 8) -> Split:
    """Noisy images tinted with the class's color: the channel means alone tell the classes apart."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, color in enumerate(COLORS):
        for _ in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            images.append(Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)))
            labels.append(label)
    return Split(images, labels)


def separable_dataset() -> ImageDataset:
    return ImageDataset(name="separable", classes=["red", "green", "blue"], color_mode="RGB",
                        default_image_size=8, train=_separable(8, seed=0), val=_separable(4, seed=1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_learns_a_separable_dataset(tmp_path, arch):
    # Three optimizer steps per epoch, 18 in all: a short run, where BatchNorm's running statistics lag most.
    result = train(TrainConfig(dataset="separable", arch=arch, epochs=6, batch_size=8, warmup_epochs=0,
                               augment="none", out_dir=tmp_path), separable_dataset())
    accuracies = [round(h["val_accuracy"], 3) for h in result.history]
    # Chance is 1/3; the colors alone separate the classes.
    assert result.val_accuracy >= 0.9, f"{arch}: validation accuracy per epoch {accuracies}"

