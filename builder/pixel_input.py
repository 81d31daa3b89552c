"""A classifier that takes 8-bit pixels: the normalization of its preprocessing spec moved into the graph.

The published model's input becomes N x H x W x C uint8 (what a decoded, resized and cropped image
already is), followed by Cast, Transpose to NCHW, and `(x / 255 - mean) / std` as one Mul and one Add.
A request then carries a quarter of the bytes of float32 tensors (147 KiB instead of 588 KiB for a
224x224 RGB image), and the client does no float arithmetic at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.compose
from onnx import TensorProto, helper, numpy_helper

from server.preprocess import PreprocessSpec

from .errors import PublishError, error_line

NORMALIZED = "pixel_input.normalized"  # the edge that joins the prefix to the original input


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def normalization_prefix(
    input_name: str, spec: PreprocessSpec, opset: int, ir_version: int, batch: int | str = "batch"
) -> onnx.ModelProto:
    """uint8 N x H x W x C -> float32 N x C x H x W, normalized as `spec` says; N is `batch`."""
    mean, std = np.asarray(spec.mean, dtype=np.float64), np.asarray(spec.std, dtype=np.float64)
    shape = (1, spec.channels, 1, 1)
    scale = numpy_helper.from_array((1.0 / (255.0 * std)).astype(np.float32).reshape(shape), "pixel_input.scale")
    shift = numpy_helper.from_array((-mean / std).astype(np.float32).reshape(shape), "pixel_input.shift")
    nodes = [
        helper.make_node("Cast", [input_name], ["pixel_input.float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pixel_input.float"], ["pixel_input.nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["pixel_input.nchw", "pixel_input.scale"], ["pixel_input.scaled"]),
        helper.make_node("Add", ["pixel_input.scaled", "pixel_input.shift"], [NORMALIZED]),
    ]
    graph = helper.make_graph(
        nodes,
        "pixel_input",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.UINT8, [batch, spec.image_size, spec.image_size, spec.channels]
            )
        ],
        [
            helper.make_tensor_value_info(
                NORMALIZED, TensorProto.FLOAT, [batch, spec.channels, spec.image_size, spec.image_size]
            )
        ],
        initializer=[scale, shift],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def add_pixel_input(onnx_path: Path, spec: PreprocessSpec, output: Path) -> Path:
    """Write to `output` the model of `onnx_path` behind a uint8 NHWC input of the same name."""
    model = onnx.load(str(onnx_path))
    initializers = {i.name for i in model.graph.initializer}
    model_input = next(i for i in model.graph.input if i.name not in initializers)
    # A model with a fixed batch keeps it: the new input must not promise batches the graph cannot run.
    batch = model_input.type.tensor_type.shape.dim[0].dim_value or "batch"
    input_name = model_input.name
    prefix = normalization_prefix(input_name, spec, _default_opset(model), model.ir_version, batch)
    try:
        merged = onnx.compose.merge_models(prefix, model, io_map=[(NORMALIZED, input_name)])
        onnx.checker.check_model(merged)
    except (ValueError, onnx.checker.ValidationError) as e:
        raise PublishError(f"cannot give {onnx_path} an 8-bit pixel input: {error_line(e)}") from e
    del merged.metadata_props[:]
    merged.metadata_props.extend(model.metadata_props)
    onnx.save(merged, str(output))
    return output
