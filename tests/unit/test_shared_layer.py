"""The builder's shared layer: the checkpoint's typed metadata, the ONNX metadata contract, one error type
for files that are not ONNX, the fine-tune's device, and one-line error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from builder import loop
from builder.checkpoint import ModelMeta, load_model, save_model
from builder.errors import BuilderError, CheckpointError, OnnxFileError, error_line
from builder.models import create_model
from builder.onnx_graph import torch_to_onnx
from builder.onnx_meta import OnnxMeta, load_onnx, onnx_metadata, read_onnx_meta, set_metadata
from server.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=8, resize_size=9, mean=(0.5,), std=(0.25,), color_mode="L")
# A checkpoint's meta as builders have written it (train.py's keys, an epoch's additions).
OLD_META = {
    "arch": "resnet18", "num_classes": 3, "in_channels": 1, "image_size": 8, "classes": ["a", "b", "c"],
    "preprocess": SPEC.to_dict(), "config": {"dataset": "digits", "val_fraction": 0.25, "seed": 7, "lr": 0.003},
    "recipe": {"dropout": 0.0, "device": "cpu", "amp": False, "init": None},
    "epoch": 2, "val_accuracy": 0.75,
}


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
        meta.spec


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


def test_model_meta_round_trips_through_onnx_metadata(tmp_path):
    meta = ModelMeta.from_dict(OLD_META)
    model = create_model("resnet18", num_classes=3, in_channels=1, image_size=8)
    path = tmp_path / "model.onnx"
    proto = torch_to_onnx(model, torch.zeros(1, *meta.input_shape), path)
    set_metadata(proto, onnx_metadata(meta, tmp_path / "best.pt"))
    import onnx

    onnx.save(proto, str(path))
    read = read_onnx_meta(path)
    assert isinstance(read, OnnxMeta)
    assert read.preprocess == meta.preprocess and read.classes == meta.classes
    assert read.dataset_recipe == meta.dataset_recipe and read.has_dataset
    assert read.props["arch"] == "resnet18" and read.props["pruned"] == "false"
    assert read.props["source_checkpoint"] == str((tmp_path / "best.pt").resolve())
    assert read.with_dataset("shapes").dataset_recipe == {**meta.dataset_recipe, "source": "shapes"}


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage" * 10, b"PK\x03\x04 not a model"])
def test_a_file_that_is_not_onnx_raises_one_error_type_everywhere(tmp_path, content):
    from builder.evaluate import onnx_session
    from builder.publish import inspect_onnx
    from builder.quantize import quantize_int8

    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    for reader in (load_onnx, onnx_session, inspect_onnx, lambda p: quantize_int8(p, tmp_path / "int8.onnx")):
        with pytest.raises(OnnxFileError) as caught:
            reader(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.onnx"] if content is not None else [])


class _Stop(Exception):
    pass


class _DeviceProbe(nn.Module):
    """Records where its weights and its input are at the first forward pass, then stops the run."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.linear.weight.device.type, x.device.type))
        raise _Stop


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4)), batch_size=4)


def test_finetune_trains_on_the_device_it_is_given():
    probe = _DeviceProbe()
    with pytest.raises(_Stop):
        loop.finetune(probe, _loader(), epochs=1, lr=1e-3, weight_decay=0.0, device="meta", amp=False)
    assert probe.seen == [("meta", "meta")]


def test_finetune_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.default_device() == "cpu"


def test_error_line_is_the_first_line_or_the_type():
    assert error_line(ValueError("first\nsecond")) == "first"
    assert error_line(ValueError("\n  \nreal reason\nmore")) == "real reason"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(RuntimeError("")) == "RuntimeError"
    assert issubclass(OnnxFileError, BuilderError)


@pytest.mark.parametrize("props", [{"preprocess": "{not json"}, {"preprocess": "{}"}, {"labels": "3"},
                                   {"dataset": "[1, 2]"}])
def test_malformed_onnx_metadata_is_one_onnx_file_error(props):
    with pytest.raises(OnnxFileError, match="model.onnx: its metadata .* is malformed"):
        OnnxMeta.from_props(props, source="model.onnx")
