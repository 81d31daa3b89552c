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


def conv_classifier(path: Path, qdq_zero_point=None) -> Path:
    """A hand-built classifier, input (N, 1, 4, 4) -> Conv -> logits (N, 2). With `qdq_zero_point` (a numpy
    scalar), Q/DQ on the input and the weight with that zero point: int8 0 is TensorRT's form, uint8 128 that
    of ONNX Runtime's activations."""
    from onnx import TensorProto, helper

    initializers = [numpy_helper.from_array(np.ones((2, 1, 4, 4), np.float32), "weight")]
    nodes, conv_inputs = [], ["input", "weight"]
    if qdq_zero_point is not None:
        initializers += [
            numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
            numpy_helper.from_array(np.array(qdq_zero_point), "zero_point"),
        ]
        for name in ("input", "weight"):
            nodes += [
                helper.make_node("QuantizeLinear", [name, "scale", "zero_point"], [f"{name}_q"], name=f"q_{name}"),
                helper.make_node("DequantizeLinear", [f"{name}_q", "scale", "zero_point"], [f"{name}_dq"]),
            ]
        conv_inputs = ["input_dq", "weight_dq"]
    nodes += [helper.make_node("Conv", conv_inputs, ["conv"]), helper.make_node("Flatten", ["conv"], ["logits"])]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return Path(path)


def with_metadata(source: Path, output: Path, **props: str | None) -> Path:
    """`source` with metadata entries set to the given values, or removed where the value is None."""
    model = onnx.load(str(source))
    kept = {p.key: p.value for p in model.metadata_props if p.key not in props}
    kept.update({key: value for key, value in props.items() if value is not None})
    del model.metadata_props[:]
    for key, value in kept.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(output))
    return output
