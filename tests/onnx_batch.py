"""Fixed-batch copies of an exported classifier, as an export without a dynamic batch axis would make them."""

from pathlib import Path

import onnx


def with_fixed_batch(source: Path, output: Path, batch: int) -> Path:
    """`source` with its input's and outputs' batch axis fixed at `batch` (the graph itself works for any)."""
    proto = onnx.load(str(source))
    for value in (proto.graph.input[0], *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    del proto.graph.value_info[:]  # inferred shapes that still name the symbolic batch
    onnx.save(proto, str(output))
    return output
