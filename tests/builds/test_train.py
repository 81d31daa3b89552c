"""Every architecture `builder train` offers learns a small, plainly separable dataset in a few epochs,
and a run whose validation accuracy stays at chance says so."""

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


def test_a_run_stuck_at_chance_on_validation_ends_with_a_warning(tmp_path, capsys):
    from builder.cli import main

    # Validation images all look like the first class but carry every label: nothing scores above 1/3 there.
    dataset = separable_dataset()
    red = _separable(6, seed=2).images[:6]
    dataset.val = Split(red + red + red, [0] * 6 + [1] * 6 + [2] * 6)
    result = train(TrainConfig(dataset="separable", epochs=3, batch_size=8, warmup_epochs=0, augment="none",
                               out_dir=tmp_path), dataset)
    assert max(h["train_accuracy"] for h in result.history) >= 0.9
    (warning,) = result.warnings
    assert "validation accuracy stayed at chance" in warning and "chance 0.333 on 18 images" in warning
    assert "WARNING: validation accuracy stayed at chance" in capsys.readouterr().err


@pytest.mark.parametrize("val, train, warned", [
    ([0.10, 0.11, 0.10], [0.40, 0.80, 0.95], True),   # ten balanced classes: chance 0.1
    ([0.10, 0.45, 0.80], [0.40, 0.80, 0.95], False),  # it generalizes
    ([0.10, 0.10, 0.11], [0.10, 0.12, 0.15], False),  # it learned nothing at all: a different problem
])
def test_the_chance_warning_needs_training_to_climb_while_validation_stays(val, train, warned):
    from builder.train import chance_warning

    history = [{"epoch": i + 1, "val_accuracy": v, "train_accuracy": t} for i, (v, t) in enumerate(zip(val, train))]
    labels = [i % 10 for i in range(1000)]
    assert (chance_warning(history, labels) is not None) is warned
