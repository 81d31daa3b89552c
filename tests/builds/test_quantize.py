import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.checkpoint import load_model
from builder.data import load_dataset
from builder.evaluate import evaluate, validation_data
from builder.onnx_meta import read_metadata, read_onnx_meta
from builder.quantize import QuantizeConfig, QuantizeError, convert_fp16, quantize_int8
from builder.transforms import validation_images
from tests.int8 import integer_kernel_agreement


@pytest.fixture(scope="module")
def int8(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "int8.onnx"
    return quantize_int8(tiny_run / "model.onnx", output, QuantizeConfig(calibration_images=64, method="entropy"))


def _data(onnx_path):
    return validation_data(read_onnx_meta(onnx_path).with_dataset("digits"))


def test_int8_model_is_qdq_with_per_channel_weights_and_keeps_the_metadata(int8, tiny_run):
    proto = onnx.load(str(int8.onnx_path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weight_scales = [i for i in proto.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1]
    assert weight_scales, "per-channel weights have one scale per output channel"
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["precision"] == "int8" and metadata["calibration_method"] == "entropy"
    assert json.loads(metadata["labels"]) == [str(i) for i in range(10)]
    assert int8.onnx_path.stat().st_size * 3 < (tiny_run / "model.onnx").stat().st_size
    # The float model's top-1 is not carried over as the INT8 model's own.
    assert "val_accuracy" in read_metadata(tiny_run / "model.onnx") and "val_accuracy" not in metadata


def test_int8_model_mostly_agrees_with_fp32_on_the_validation_split(int8, tiny_run):
    data = _data(tiny_run / "model.onnx")
    fp32, quantized = evaluate(tiny_run / "model.onnx", data), evaluate(int8.onnx_path, data)
    assert np.mean(fp32.predictions == quantized.predictions) > 0.9


def _conv_weights(proto) -> list[np.ndarray]:
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    return [initializers[producers[n.input[1]].input[0]] for n in proto.graph.node if n.op_type == "Conv"]


def test_int8_weights_keep_to_7_bits_so_the_served_kernels_compute_what_was_calibrated(int8, tiny_run, tmp_path):
    from builder.cli import main

    proto = onnx.load(str(int8.onnx_path))
    weights = _conv_weights(proto)
    # Symmetric 7 bits is -64..64 in ONNX Runtime: 255 x 64 x 2 still fits the int16 sum.
    assert len(weights) == 20 and all(w.dtype == np.int8 and np.abs(w.astype(np.int16)).max() <= 64 for w in weights)
    assert read_metadata(int8.onnx_path)["weight_bits"] == "7"
    _, meta = load_model(tiny_run / "best.pt")
    images = validation_images(meta.preprocess, load_dataset("digits"), 360).numpy()
    # On x86 without VNNI, 8-bit weights saturate the integer kernels (95.6% here on an AVX2 CPU).
    assert integer_kernel_agreement(int8.onnx_path, images) >= 0.99
    # Asked for, the full 8 bits: for serving CPUs with VNNI.
    full = tmp_path / "full.onnx"
    assert (
        main(
            [
                "quantize",
                "--onnx",
                str(tiny_run / "model.onnx"),
                "--output",
                str(full),
                "--calibration-images",
                "64",
                "--full-range-weights",
            ]
        )
        == 0
    )
    proto = onnx.load(str(full))
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in _conv_weights(proto)) > 64
    assert read_metadata(full)["weight_bits"] == "8"


def test_a_calibration_set_smaller_than_asked_is_refused_and_nothing_is_written(tiny_run, tmp_path):
    with pytest.raises(QuantizeError, match="asked for 100000 calibration images but the training split"):
        quantize_int8(tiny_run / "model.onnx", tmp_path / "int8.onnx", QuantizeConfig(calibration_images=100000))
    assert list(tmp_path.iterdir()) == []


def test_fp16_conversion_keeps_fp32_inputs_and_the_predictions(tiny_run, tmp_path):
    half = convert_fp16(tiny_run / "model.onnx", tmp_path / "fp16.onnx")
    proto = onnx.load(str(half))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    data = _data(tiny_run / "model.onnx")
    assert np.mean(evaluate(half, data).predictions == evaluate(tiny_run / "model.onnx", data).predictions) > 0.95


# ---- GPU INT8: ModelOpt's Q/DQ for TensorRT's explicit quantization ----

# Operators onnx-tensorrt's docs/operators.md (TensorRT 10.x) marks supported that a torchvision classifier
# exported here can contain; anything else in the GPU file would make the parser fail.
TENSORRT_CLASSIFIER_OPS = {
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "DequantizeLinear",
    "Div",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "MatMul",
    "MaxPool",
    "Mul",
    "QuantizeLinear",
    "Relu",
    "Reshape",
    "Sigmoid",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
}
# Same document: "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20".
TENSORRT_OPSETS = range(9, 21)


@pytest.fixture(scope="module")
def gpu_int8(tiny_run, small_digits, tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu-int8") / "int8-gpu.onnx"
    # The small slice's training split calibrates; the full validation split of the run scores it below.
    return quantize_int8(
        tiny_run / "model.onnx", output, QuantizeConfig(calibration_images=64, target="gpu"), dataset=small_digits
    )


def _qdq_zero_points(proto):
    initializers = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
            yield node, zero_point


def test_gpu_int8_obeys_the_tensorrt_onnx_parser_rules(gpu_int8, int8):
    from builder.quantize import tensorrt_parser_problems

    proto = onnx.load(str(gpu_int8.onnx_path))
    qdq = list(_qdq_zero_points(proto))
    assert len(qdq) > 40, "every convolution's input and weight is quantized"
    # operators.md: QuantizeLinear's y_zero_point and DequantizeLinear's x_zero_point must be 0, INT8 only.
    # Without a zero point ONNX means uint8, so each must be present.
    for node, zero_point in qdq:
        assert zero_point is not None, f"{node.name} has no zero point (ONNX then means uint8)"
        assert zero_point.data_type == onnx.TensorProto.INT8, f"{node.name}: zero point is not int8"
        assert not numpy_helper.to_array(zero_point).any(), f"{node.name}: zero point is not 0"
    assert {n.op_type for n in proto.graph.node} <= TENSORRT_CLASSIFIER_OPS
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")][0] in TENSORRT_OPSETS
    assert tensorrt_parser_problems(proto) == []
    # The CPU file (uint8 activations, non-zero zero points) is what these rules exist to catch.
    cpu_problems = tensorrt_parser_problems(onnx.load(str(int8.onnx_path)))
    assert cpu_problems and any("uint8" in p for p in cpu_problems)


def test_gpu_int8_top1_is_within_the_build_accuracy_budget_and_keeps_the_metadata(gpu_int8, tiny_run):
    from builder.build import BuildConfig

    data = _data(tiny_run / "model.onnx")
    fp32, quantized = evaluate(tiny_run / "model.onnx", data), evaluate(gpu_int8.onnx_path, data)
    assert quantized.images == 360
    assert 100 * (fp32.top1 - quantized.top1) <= BuildConfig().max_accuracy_drop
    metadata = read_metadata(gpu_int8.onnx_path)
    source = read_metadata(tiny_run / "model.onnx")
    assert metadata["preprocess"] == source["preprocess"] and metadata["labels"] == source["labels"]
    assert metadata["precision"] == "int8" and metadata["target"] == "gpu"
    assert metadata["quantizer"].startswith("nvidia-modelopt ") and metadata["calibration_images"] == "64"


def test_quantize_cli_writes_the_gpu_int8_beside_the_input(tiny_run, tmp_path, capsys):
    import shutil

    from builder.cli import main

    shutil.copy(tiny_run / "model.onnx", tmp_path / "model.onnx")
    assert (
        main(["quantize", "--onnx", str(tmp_path / "model.onnx"), "--target", "gpu", "--calibration-images", "32"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)  # the quantizer's own log stays off stdout
    assert printed["onnx"] == str(tmp_path / "model-int8-gpu.onnx") and printed["target"] == "gpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8-gpu.onnx", "model.onnx"]


def test_gpu_int8_refuses_a_calibration_method_modelopt_lacks(tiny_run, tmp_path, capsys):
    from builder.cli import main

    assert (
        main(
            [
                "quantize",
                "--onnx",
                str(tiny_run / "model.onnx"),
                "--output",
                str(tmp_path / "x.onnx"),
                "--target",
                "gpu",
                "--calibration-method",
                "percentile",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("builder quantize: error:") and "\n" not in err and "minmax, entropy" in err
    assert list(tmp_path.iterdir()) == []


def test_gpu_int8_of_a_model_with_its_weights_in_a_separate_file(tiny_run, small_digits, tmp_path):
    # torch.onnx.export's default writes the weights beside the .onnx; ModelOpt must get them too.
    source = tmp_path / "export" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(tiny_run / "model.onnx")), str(source), save_as_external_data=True, location="w.data")
    assert (source.parent / "w.data").stat().st_size > source.stat().st_size
    output = tmp_path / "int8-gpu.onnx"
    quantize_int8(source, output, QuantizeConfig(calibration_images=32, target="gpu"), dataset=small_digits)
    from builder.quantize import tensorrt_parser_problems

    assert tensorrt_parser_problems(onnx.load(str(output))) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "int8-gpu.onnx"]

    # The weight file gone: one line that names the model, nothing written.
    (source.parent / "w.data").unlink()
    with pytest.raises(QuantizeError, match=r"could not read .*model\.onnx with its weights"):
        quantize_int8(
            source, tmp_path / "again.onnx", QuantizeConfig(calibration_images=32, target="gpu"), dataset=small_digits
        )
    assert not (tmp_path / "again.onnx").exists()
