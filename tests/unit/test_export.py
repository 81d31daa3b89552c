"""ONNX export: a file that is not a checkpoint."""

import pytest

from builder.errors import CheckpointError
from builder.export import export_onnx


def test_export_of_a_non_checkpoint_fails_without_writing(tmp_path):
    bogus = tmp_path / "best.pt"
    bogus.write_text("nope")
    with pytest.raises(CheckpointError):
        export_onnx(bogus, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == [bogus]
