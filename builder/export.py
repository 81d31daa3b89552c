"""ONNX export with a dynamic batch axis, checked against PyTorch on real validation images.

BatchNorm is folded into the convolutions and the graph simplified with onnxslim before the check,
so the parity check covers the file that is published.

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

from .data import ImageDataset, load_dataset
from .errors import ExportError
from .evaluate import dataset_recipe
from .train import eval_transform

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


def parity_batch(meta: dict, count: int = 32, dataset: ImageDataset | None = None) -> torch.Tensor:
    """The first `count` validation images of the run's dataset, through the eval transform."""
    recipe = dataset_recipe(meta)
    dataset = dataset or load_dataset(recipe["source"], val_fraction=recipe["val_fraction"], seed=recipe["seed"])
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


def export_onnx(checkpoint: Path, output: Path, *, parity_images: int = 32, simplify: bool = True) -> ExportResult:
    """Export `checkpoint` (trained or pruned) to `output`; fails if ONNX Runtime and PyTorch disagree beyond 1e-4."""
    from .prune import load_model

    model, meta = load_model(checkpoint)
    batch = parity_batch(meta, parity_images)
    return export_model(model, meta, output, parity=batch, source=checkpoint, simplify=simplify)


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis and the project's tensor names; the loaded graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # In eval mode the exporter folds each BatchNorm into the convolution before it.
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load(str(path))


def simplify_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding, dead-node removal, fusions; metadata is re-added by the caller."""
    import onnxslim

    try:
        slimmed = onnxslim.slim(proto)
    except Exception as e:  # onnxslim raises whatever its passes raise
        raise ExportError(f"onnxslim could not simplify the exported graph: {e}") from e
    del slimmed.metadata_props[:]
    return slimmed


def onnx_metadata(meta: dict, source: Path | None) -> dict[str, str]:
    return {
        "preprocess": json.dumps(meta["preprocess"]),
        "labels": json.dumps(meta["classes"]),
        "dataset": json.dumps(dataset_recipe(meta)),
        "source_checkpoint": str(Path(source).resolve()) if source else "",
        "arch": meta["arch"],
        "val_accuracy": str(meta.get("val_accuracy", "")),
        "pruned": "true" if meta.get("layer_shapes") or meta.get("pruning") else "false",
    }


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def export_model(model: torch.nn.Module, meta: dict, output: Path, *, parity: torch.Tensor,
                 source: Path | None = None, simplify: bool = True) -> ExportResult:
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
