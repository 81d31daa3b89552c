"""ONNX export with a dynamic batch axis, checked against PyTorch on real validation images.

The preprocessing spec and the class labels travel inside the ONNX file (`metadata_props`),
so `publish` needs nothing but the exported model.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from server.preprocess import PreprocessSpec

from .data import load_dataset
from .errors import ExportError
from .train import eval_transform, load_checkpoint

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    max_abs_diff: float
    parity_images: int


def parity_batch(meta: dict, count: int = 32) -> torch.Tensor:
    """The first `count` validation images of the run's dataset, through the eval transform."""
    config = meta["config"]
    dataset = load_dataset(config["dataset"], val_fraction=config["val_fraction"], seed=config["seed"])
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    transform = eval_transform(spec)
    count = min(count, len(dataset.val))
    return torch.stack([transform(dataset.val.image(i, dataset.color_mode)) for i in range(count)])


def max_abs_difference(onnx_path: Path, model: torch.nn.Module, batch: torch.Tensor) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    with torch.no_grad():
        torch_logits = model(batch).numpy()
    return float(np.max(np.abs(onnx_logits - torch_logits)))


def export_onnx(checkpoint: Path, output: Path, *, parity_images: int = 32) -> ExportResult:
    """Export `checkpoint` to `output` and fail if ONNX Runtime and PyTorch disagree beyond 1e-4."""
    model, meta = load_checkpoint(checkpoint)
    batch = parity_batch(meta, parity_images)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (batch[:1],), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    metadata = {
        "preprocess": json.dumps(meta["preprocess"]),
        "labels": json.dumps(meta["classes"]),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "arch": meta["arch"],
        "val_accuracy": str(meta.get("val_accuracy", "")),
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp))
    try:
        difference = max_abs_difference(tmp, model, batch)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    if not difference <= PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX output differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE:.0e}) on "
            f"{len(batch)} validation images; not writing {output}"
        )
    os.replace(tmp, output)
    log.info("exported %s: max |onnx - torch| = %.2e on %d images", output, difference, len(batch))
    return ExportResult(output, difference, len(batch))
