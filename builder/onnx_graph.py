"""A PyTorch model as an ONNX graph: the tensor names and opset every exported file uses, the TorchScript
export with a dynamic batch axis, and onnxslim's simplification."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from .errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis and the project's tensor names; the loaded graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # In eval mode the exporter folds each BatchNorm into the convolution before it.
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
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
