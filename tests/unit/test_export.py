import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder.errors import CheckpointError
from builder.export import export_onnx, parity_batch
from builder.checkpoint import load_model


def test_export_matches_pytorch_and_carries_spec_and_labels(tiny_run):
    proto = onnx.load(str(tiny_run / "model.onnx"))
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["labels"]) == [str(i) for i in range(10)]
    assert json.loads(metadata["preprocess"])["image_size"] == 8
    model, meta = load_model(tiny_run / "best.pt")
    batch = parity_batch(meta, 8)
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": batch.numpy()})
    np.testing.assert_allclose(logits, model(batch).detach().numpy(), atol=1e-4)


def test_exported_model_takes_any_batch_size(tiny_run):
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 5, 33):
        (logits,) = session.run(None, {"input": np.zeros((size, 1, 8, 8), np.float32)})
        assert logits.shape == (size, 10)


def test_export_of_a_non_checkpoint_fails_without_writing(tmp_path):
    bogus = tmp_path / "best.pt"
    bogus.write_text("nope")
    with pytest.raises(CheckpointError):
        export_onnx(bogus, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == [bogus]


def test_exported_graph_has_batchnorm_folded_into_the_convolutions(tiny_run):
    ops = {node.op_type for node in onnx.load(str(tiny_run / "model.onnx")).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_pruned_checkpoint_exports_with_parity(tiny_run, tmp_path):
    from builder.prune import PruneConfig, prune

    pruned = prune(tiny_run / "best.pt", tmp_path / "pruned.pt", PruneConfig(steps=1, finetune_epochs=0, increments=40))
    result = export_onnx(pruned.checkpoint, tmp_path / "pruned.onnx", parity_images=8)
    assert result.max_abs_diff <= 1e-4
    assert {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}["pruned"] == "true"
    assert result.onnx_path.stat().st_size < (tiny_run / "model.onnx").stat().st_size
