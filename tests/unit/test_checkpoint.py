"""The checkpoint's typed metadata, loading and saving checkpoints in the format builders have written, and
initializing a model from another checkpoint's weights."""

from __future__ import annotations

import pytest
import torch

from builder.checkpoint import ModelMeta, load_init_weights, load_model, save_model
from builder.errors import CheckpointError
from builder.models import classifier, create_model
from tests.checkpoints import OLD_META, SPEC


def test_model_meta_round_trips_through_the_checkpoint_dict():
    meta = ModelMeta.from_dict(OLD_META)
    assert meta.input_shape == (1, 8, 8) and meta.classes == ("a", "b", "c") and meta.preprocess == SPEC
    assert meta.dataset_recipe == {"source": "digits", "val_fraction": 0.25, "seed": 7}
    assert meta.to_dict() == OLD_META
    assert ModelMeta.from_dict(meta.to_dict()) == meta
    # Keys a later builder adds survive a load and a save.
    assert ModelMeta.from_dict({**OLD_META, "note": "kept"}).to_dict() == {**OLD_META, "note": "kept"}


def test_a_meta_with_only_what_rebuilding_needs_loads_and_saves_as_it_was():
    minimal = {"arch": "resnet18", "num_classes": 3, "in_channels": 1, "image_size": 8}
    meta = ModelMeta.from_dict(minimal)
    assert meta.preprocess is None and meta.classes == () and meta.input_shape == (1, 8, 8)
    assert meta.to_dict() == {**minimal, "config": {}, "recipe": {}}
    with pytest.raises(CheckpointError, match="no preprocessing spec"):
        _ = meta.spec


def test_a_meta_without_a_required_key_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="'image_size'"):
        ModelMeta.from_dict({k: v for k, v in OLD_META.items() if k != "image_size"})


def test_an_old_format_checkpoint_loads_and_saves_in_the_same_format(tmp_path):
    model = create_model("resnet18", num_classes=3, in_channels=1, image_size=8).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "meta": OLD_META}, path)  # as train.py has always written it
    loaded, meta = load_model(path)
    batch = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(batch), model(batch))
    assert meta == ModelMeta.from_dict(OLD_META) and not loaded.training
    copy = save_model(loaded, meta, tmp_path / "copy.pt")
    payload = torch.load(copy, weights_only=True)
    assert set(payload) == {"model", "meta"} and payload["meta"] == OLD_META
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing half-written left


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(bogus)
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(other)


def test_init_skips_the_classifier_when_the_class_count_differs(tmp_path):
    source = create_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "ten.pt"
    torch.save({"model": source.state_dict(), "meta": {"arch": "resnet18"}}, path)
    target = create_model("resnet18", num_classes=4, in_channels=1, image_size=8, dropout=0.3)
    report = load_init_weights(target, path)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert classifier(target).out_features == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        load_init_weights(target, tmp_path / "missing.pt")
