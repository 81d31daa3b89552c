import math

import numpy as np
import pytest
import torch

from builder.data import load_dataset, resolve_spec
from builder.errors import CheckpointError, DatasetError
from builder.models import create_model
from builder.checkpoint import load_model
from builder.schedules import warmup_cosine


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    values = [warmup_cosine(step, warmup_steps=4, total_steps=14) for step in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0
    assert values[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert warmup_cosine(14, warmup_steps=4, total_steps=14) == pytest.approx(0.0)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(bogus)
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(other)


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


@pytest.mark.parametrize("layout, message", [
    ("missing", "neither a built-in"),
    ("empty", "no class subfolders"),
    ("empty_class", "has no images"),
])
def test_bad_dataset_folders_are_named(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        (root / "cats").mkdir()
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(root))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_small_inputs_keep_their_resolution_through_the_stem(arch):
    model = create_model(arch, num_classes=4, in_channels=1, image_size=32).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
    first = model.conv1 if arch.startswith("resnet") else model.features[0][0]
    assert first.stride == (1, 1) and first.in_channels == 1


@pytest.mark.parametrize("source", ["digits", "shapes:per_class=4,size=20"])
@pytest.mark.parametrize("equalize", [False, True])
def test_gateway_preprocessing_equals_the_training_eval_transform(source, equalize):
    from server.preprocess import PreprocessSpec, preprocess

    from builder.transforms import eval_transform

    dataset = load_dataset(source)
    spec = resolve_spec(dataset, image_size=16, equalize=equalize)
    # Through the gateway's own spec transport: Triton's string parameters.
    served = PreprocessSpec.from_parameters(spec.to_parameters())
    assert served == spec and served.equalize is equalize
    transform = eval_transform(spec)
    for image in dataset.val.images[:8]:
        expected = preprocess(image, served)
        assert expected.shape == spec.input_shape
        np.testing.assert_array_equal(transform(image).numpy(), expected)


def test_equalization_changes_the_input_and_is_off_for_old_specs():
    from server.preprocess import PreprocessSpec, preprocess

    image = load_dataset("shapes:per_class=2,size=16").train.images[0]
    plain = PreprocessSpec.from_dict({"image_size": 16, "resize_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert plain.equalize is False
    equalized = PreprocessSpec(16, 16, (0.5,) * 3, (0.25,) * 3, equalize=True)
    assert not np.array_equal(preprocess(image, plain), preprocess(image, equalized))
