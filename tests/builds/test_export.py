import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from builder.checkpoint import load_model
from builder.errors import ExportError
from builder.export import export_model, export_onnx, parity_batch


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


def test_exported_graph_has_batchnorm_folded_into_the_convolutions(tiny_run):
    ops = {node.op_type for node in onnx.load(str(tiny_run / "model.onnx")).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_pruned_checkpoint_exports_with_parity(tiny_run, tmp_path):
    from builder.prune import PruneConfig, load_model, prune

    pruned = prune(tiny_run / "best.pt", tmp_path / "pruned.pt", PruneConfig(steps=1, finetune_epochs=0, increments=40))
    result = export_onnx(pruned.checkpoint, tmp_path / "pruned.onnx", parity_images=8)
    # Parity measured here, not taken from the exporter's own figure.
    model, meta = load_model(pruned.checkpoint)
    batch = parity_batch(meta, 8)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(batch).numpy(), atol=1e-4)
    assert {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}["pruned"] == "true"
    assert result.onnx_path.stat().st_size < (tiny_run / "model.onnx").stat().st_size


class DriftingClassifier(nn.Module):
    """Adds how often it has run to its logits: the exported graph keeps the count it had when traced, so
    ONNX Runtime and PyTorch disagree by whole units."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(x.flatten(1)) + float(self.calls)


def test_an_export_that_disagrees_with_pytorch_is_refused_and_nothing_is_written(tiny_run, tmp_path):
    _, meta = load_model(tiny_run / "best.pt")
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match=r"differs from PyTorch by .* not writing"):
        export_model(DriftingClassifier(), meta, output, parity=parity_batch(meta, 4), simplify=False)
    assert list((tmp_path / "out").iterdir()) == []
