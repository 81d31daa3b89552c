"""What TensorRT's ONNX parser accepts (onnx-tensorrt docs/operators.md, TensorRT 10.x), checked on the CPU.

`builder quantize --target gpu` checks the file it writes; `builder engine --precision int8` checks the file
it is given, before anything is built: TensorRT builds INT8 from Q/DQ in this form (explicit quantization).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from .errors import EngineError, OnnxFileError, error_line
from .onnx_meta import load_onnx

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

# What TensorRT's ONNX parser accepts, from onnx-tensorrt's docs/operators.md (TensorRT 10.x): operators
# in the inclusive opset range 9 to 20; Q/DQ only as INT8 (or FP8/INT4) with a zero point of 0; and the
# operators the support matrix marks supported (the whole list, so a graph surgery that adds one is covered).
TENSORRT_OPSETS = range(9, 21)
TENSORRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)


def tensorrt_parser_problems(proto: onnx.ModelProto) -> list[str]:
    """Where a QDQ graph breaks TensorRT's ONNX parser rules (onnx-tensorrt docs/operators.md); [] if nowhere."""
    problems = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in TENSORRT_OPSETS:
        problems.append(f"opset {opset} is outside {TENSORRT_OPSETS.start}..{TENSORRT_OPSETS.stop - 1}")
    unsupported = sorted(
        {
            f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            for n in proto.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_ONNX_OPS
        }
    )
    if unsupported:
        problems.append(f"operators TensorRT does not parse: {', '.join(unsupported)}")
    return problems + qdq_problems(proto)


def qdq_problems(proto: onnx.ModelProto) -> list[str]:
    """Each QuantizeLinear/DequantizeLinear that is not INT8 with zero point 0; [] if none is."""
    problems = []
    initializers = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        # Without a zero point ONNX means uint8; TensorRT takes INT8 with zero point 0 only.
        zero_point = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            problems.append(f"{node.op_type} {node.name or node.output[0]} has no int8 zero point initializer")
        elif zero_point.data_type != onnx.TensorProto.INT8:
            kind = onnx.TensorProto.DataType.Name(zero_point.data_type).lower()
            problems.append(f"{node.op_type} {node.name or node.output[0]} is {kind}, not int8")
        elif np.any(numpy_helper.to_array(zero_point)):
            problems.append(f"{node.op_type} {node.name or node.output[0]} has a non-zero zero point")
    return problems


def check_explicit_int8(onnx_path: Path) -> None:
    """Refuse, in one line that says what to run, a model TensorRT cannot build an explicit INT8 engine from:
    a float model (no Q/DQ), or Q/DQ other than INT8 with zero point 0 (ONNX Runtime's uint8 QDQ)."""
    proto = load_onnx(Path(onnx_path))
    if any(uses_external_data(t) for t in proto.graph.initializer):  # zero points may be stored beside it
        try:
            load_external_data_for_model(proto, str(Path(onnx_path).parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise OnnxFileError(f"{onnx_path}: its weights stored beside it cannot be read: {error_line(e)}") from None
    remedy = (
        "run `builder quantize --target gpu` on the float model and build the engine from the file it writes "
        "(<model>-int8-gpu.onnx; int8-gpu.onnx in a build)"
    )
    if not any(node.op_type in QDQ_OPS for node in proto.graph.node):
        raise EngineError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear: a float model, and an INT8 engine is built "
            f"from explicit quantization only: {remedy}"
        )
    problems = qdq_problems(proto)
    if problems:
        raise EngineError(
            f"{onnx_path} is not INT8 Q/DQ in TensorRT's form (int8, zero point 0): {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}, as in ONNX Runtime's uint8 "
            f"QDQ from `builder quantize --target cpu`: {remedy}"
        )
