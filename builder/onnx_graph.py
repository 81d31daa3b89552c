"""A PyTorch model as an ONNX graph: the tensor names and opset every exported file uses, the TorchScript
export with a dynamic batch axis, and onnxslim's simplification."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
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


def onnx_macs_and_params(proto: onnx.ModelProto) -> tuple[int, int]:
    """Multiply-accumulates of one image through the graph's Conv, Gemm and MatMul nodes (shapes inferred by
    ONNX), and the elements of its floating-point initializers: a model exported elsewhere has no PyTorch
    module to count them on. Weights stored beside the file need not be loaded: their shapes are in the graph."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floats)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # onnx raises InferenceError and others; without shapes only the parameters are known
        return 0, params
    shapes = {
        v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    }
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}

    def per_image(name: str) -> int | None:
        dims = [d for d in shapes.get(name, [])[1:] if d]  # without the batch axis
        return int(np.prod(dims)) if dims and len(dims) == len(shapes[name]) - 1 else None

    macs = 0
    for node in inferred.graph.node:
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not weight:
            continue
        if node.op_type == "Conv":  # every output element sums C_in / group x kernel products
            outputs = per_image(node.output[0])
            macs += outputs * int(np.prod(weight[1:])) if outputs else 0
        elif node.op_type == "Gemm":  # one row per image: K x N products
            macs += int(np.prod(weight))
        elif len(weight) == 2:  # MatMul by a K x N weight: K products per output element
            outputs = per_image(node.output[0])
            macs += outputs * weight[0] if outputs else 0
    return macs, params
