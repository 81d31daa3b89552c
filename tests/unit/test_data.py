"""Datasets: the built-in digits split, image folders, and the preprocessing spec measured on them."""

import numpy as np
import pytest

from builder.data import load_dataset, resolve_spec
from builder.errors import DatasetError


def test_spec_mean_and_std_are_measured_on_the_training_split():
    dataset = load_dataset("digits")
    spec = resolve_spec(dataset, image_size=8)
    pixels = np.stack([np.asarray(img, dtype=np.float64) / 255 for img in dataset.train.images])
    assert spec.mean[0] == pytest.approx(pixels.mean(), rel=1e-6)
    assert spec.std[0] == pytest.approx(pixels.std(), rel=1e-6)
    assert (spec.color_mode, spec.image_size, spec.resize_size) == ("L", 8, 8)


def test_digits_split_is_stratified_and_seeded():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert a.val.labels == b.val.labels
    counts = np.bincount(a.val.labels)
    assert counts.min() >= 0.8 * counts.max()
    assert len(a.train) + len(a.val) == 1797


def test_image_folder_dataset_is_split_and_checked(tmp_path, photos):
    from PIL import Image

    for name in ("cats", "cups"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.open(photos[0 if name == "cats" else 1]).save(tmp_path / name / f"{i}.png")
    dataset = load_dataset(str(tmp_path), val_fraction=0.4)
    assert dataset.classes == ["cats", "cups"]
    assert (len(dataset.train), len(dataset.val)) == (6, 4)
    assert dataset.train.image(0, "RGB").mode == "RGB"


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "neither a built-in"),
        ("empty", "no class subfolders"),
        ("empty_class", "has no images"),
    ],
)
def test_bad_dataset_folders_are_named(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        (root / "cats").mkdir()
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(root))
