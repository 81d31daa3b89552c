"""The generated `shapes` dataset."""

import numpy as np
import pytest

from builder.data import load_dataset
from builder.errors import DatasetError
from builder.shapes import CLASSES, ShapesOptions, load_shapes, parse_source, with_options


def pixels(split):
    return np.stack([np.asarray(image) for image in split.images])


def test_shapes_are_rgb_images_of_the_asked_size_and_the_same_for_the_same_seed():
    a = load_dataset("shapes:per_class=12,size=24", seed=1)
    b = load_dataset("shapes:per_class=12,size=24", seed=1)
    c = load_dataset("shapes:per_class=12,size=24", seed=2)
    assert a.classes == list(CLASSES) and a.color_mode == "RGB" and a.default_image_size == 24
    assert {(image.mode, image.size) for image in a.train.images} == {("RGB", (24, 24))}
    assert np.array_equal(pixels(a.train), pixels(b.train)) and a.train.labels == b.train.labels
    assert not np.array_equal(pixels(a.train), pixels(c.train))
    assert pixels(a.train).std(axis=0).mean() > 20  # colors, positions and backgrounds vary


def test_shapes_training_split_has_the_asked_imbalance_and_a_balanced_validation_split():
    dataset = load_dataset("shapes:per_class=40,imbalance=10,size=16", val_fraction=0.2)
    counts = np.bincount(dataset.train.labels)
    assert counts[0] == 40 and counts[-1] == 4 and counts.max() / counts.min() == pytest.approx(10)
    assert all(a >= b for a, b in zip(counts, counts[1:]))  # geometric: decreasing
    assert len(set(np.bincount(dataset.val.labels))) == 1
    balanced = load_dataset("shapes:per_class=40,size=16", val_fraction=0.2)
    assert np.array_equal(pixels(dataset.val), pixels(balanced.val))  # val does not move with imbalance


def test_shapes_options_travel_in_the_dataset_name():
    source = with_options("shapes", imbalance=10, per_class=50)
    assert source == "shapes:per_class=50,imbalance=10"
    assert parse_source(source) == ShapesOptions(per_class=50, imbalance=10.0)
    assert load_shapes(source, val_fraction=0.2, seed=0).name == source
    with pytest.raises(DatasetError, match="unknown option 'colour'"):
        parse_source("shapes:colour=3")
    with pytest.raises(DatasetError, match="--shapes-"):
        with_options("digits", imbalance=3)
