"""The ONNX metadata contract: a checkpoint's metadata written into a model and read back."""

from __future__ import annotations

import pytest
import torch

from builder.checkpoint import ModelMeta
from builder.errors import OnnxFileError
from builder.models import create_model
from builder.onnx_graph import torch_to_onnx
from builder.onnx_meta import OnnxMeta, onnx_metadata, read_onnx_meta, set_metadata
from tests.checkpoints import OLD_META


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


@pytest.mark.parametrize(
    "props", [{"preprocess": "{not json"}, {"preprocess": "{}"}, {"labels": "3"}, {"dataset": "[1, 2]"}]
)
def test_malformed_onnx_metadata_is_one_onnx_file_error(props):
    with pytest.raises(OnnxFileError, match="model.onnx: its metadata .* is malformed"):
        OnnxMeta.from_props(props, source="model.onnx")
