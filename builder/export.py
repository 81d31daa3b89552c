"""ONNX export with a dynamic batch axis, checked against PyTorch on real validation images.

BatchNorm is folded into the convolutions and the graph simplified with onnxslim before the check,
so the parity check covers the file that is published.

The preprocessing spec and the class labels travel inside the ONNX file (`metadata_props`),
so `publish` needs nothing but the exported model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .checkpoint import ModelMeta, load_model
from .data import ImageDataset, load_run_dataset
from .errors import ExportError
from .onnx_graph import INPUT_NAME, OUTPUT_NAME, simplify_graph, torch_to_onnx
from .onnx_meta import onnx_metadata, set_metadata
from .transforms import validation_images

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    max_abs_diff: float
    parity_images: int


def parity_batch(meta: ModelMeta, count: int = 32, dataset: ImageDataset | None = None) -> torch.Tensor:
    """The first `count` validation images of the run's dataset, through the eval transform."""
    return validation_images(meta.spec, dataset or load_run_dataset(meta.dataset_recipe), count)


def max_abs_difference(onnx_path: Path, model: torch.nn.Module, batch: torch.Tensor) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    with torch.no_grad():
        torch_logits = model(batch).numpy()
    return float(np.max(np.abs(onnx_logits - torch_logits)))


def export_onnx(checkpoint: Path, output: Path, *, parity_images: int = 32, simplify: bool = True) -> ExportResult:
    """Export `checkpoint` (trained or pruned) to `output`; fails if ONNX Runtime and PyTorch disagree beyond 1e-4."""
    model, meta = load_model(checkpoint)
    batch = parity_batch(meta, parity_images)
    return export_model(model, meta, output, parity=batch, source=checkpoint, simplify=simplify)


def export_model(
    model: torch.nn.Module,
    meta: ModelMeta,
    output: Path,
    *,
    parity: torch.Tensor,
    source: Path | None = None,
    simplify: bool = True,
) -> ExportResult:
    """Export an in-memory model; the file appears at `output` only once it passed the parity check."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        proto = torch_to_onnx(model, parity[:1], tmp)
        if simplify:
            proto = simplify_graph(proto)
        set_metadata(proto, onnx_metadata(meta, source))
        onnx.save(proto, str(tmp))
        difference = max_abs_difference(tmp, model, parity)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not difference <= PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX output differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE:.0e}) on "
            f"{len(parity)} validation images; not writing {output}"
        )
    os.replace(tmp, output)
    log.info("exported %s: max |onnx - torch| = %.2e on %d images", output, difference, len(parity))
    return ExportResult(output, difference, len(parity))
