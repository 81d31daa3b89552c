"""Variants of an exported classifier that tests need: a fixed batch axis, as an export without a dynamic
one makes; other weights in the same graph, as a retraining gives."""

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def with_fixed_batch(source: Path, output: Path, batch: int) -> Path:
    """`source` with its input's and outputs' batch axis fixed at `batch` (the graph itself works for any)."""
    proto = onnx.load(str(source))
    for value in (proto.graph.input[0], *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    del proto.graph.value_info[:]  # inferred shapes that still name the symbolic batch
    onnx.save(proto, str(output))
    return output


def retrained(source: Path, target: Path) -> Path:
    """The same architecture and tensor names with other weights, as a retraining would give."""
    model = onnx.load(str(source))
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype == np.float32 and weights.size > 1:
            initializer.CopyFrom(numpy_helper.from_array(weights * np.float32(1.01), initializer.name))
    onnx.save(model, str(target))
    return target
