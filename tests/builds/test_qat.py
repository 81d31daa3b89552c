import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from builder.checkpoint import load_model
from builder.cli import main
from builder.data import load_dataset
from builder.errors import CheckpointError
from builder.evaluate import evaluate, validation_data
from builder.onnx_meta import read_onnx_meta
from builder.publish import publish
from builder.qat import QATConfig, QATError, fold_batch_norms, prepare, quantization_aware_train, top1_agreement
from builder.transforms import validation_images
from tests.int8 import integer_kernel_agreement

ONE_EPOCH = QATConfig(epochs=1, lr=1e-4, parity_images=360)


@pytest.fixture(scope="module")
def qat(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("qat") / "int8-qat.onnx"
    return quantization_aware_train(tiny_run / "best.pt", output, ONE_EPOCH)


def _metadata(proto):
    return {p.key: p.value for p in proto.metadata_props}


@pytest.mark.slow
def test_qat_model_is_qdq_with_int8_per_channel_weights(qat, tiny_run):
    proto = onnx.load(str(qat.onnx_path))
    ops = [node.op_type for node in proto.graph.node]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= set(ops)
    assert proto.opset_import[0].version >= 13
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    weight_dqs = [producers[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weight_dqs) == ops.count("Conv") + ops.count("Gemm") == 21  # ResNet-18: 20 convolutions, 1 linear
    for dq in weight_dqs:
        assert dq.op_type == "DequantizeLinear"
        weight, scale = initializers[dq.input[0]], initializers[dq.input[1]]
        assert weight.dtype == np.int8, "weights are stored quantized, not as float"
        assert scale.shape == (weight.shape[0],) and len(np.unique(scale)) > 1, "one scale per output channel"
        assert not initializers[dq.input[2]].any(), "symmetric: zero points are 0"
    # Activations: uint8, per tensor, held to 7 bits by a Clip after each quantizer (see qconfig()).
    activation_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(
        initializers[n.input[2]].dtype == np.uint8 and initializers[n.input[1]].size == 1 for n in activation_q
    )
    constants = {
        **initializers,
        **{n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"},
    }
    readers = {name: [n for n in proto.graph.node if name in n.input] for q in activation_q for name in q.output}
    for q in activation_q:
        (clip,) = readers[q.output[0]]
        assert clip.op_type == "Clip" and int(constants[clip.input[2]]) == 127, q.name
    # INT8 weights: about a quarter of the FP32 file.
    assert qat.onnx_path.stat().st_size * 3 < (tiny_run / "model.onnx").stat().st_size


@pytest.mark.slow
def test_onnx_runtime_agrees_with_the_fake_quantized_pytorch_model(qat, tiny_run):
    assert qat.parity_images == 360 and qat.agreement >= 0.98
    # Independently of the check inside quantization_aware_train: ONNX Runtime's integer kernels
    # against the fake-quantized PyTorch model, on the validation images.
    _, meta = load_model(tiny_run / "best.pt")
    images = validation_images(meta.preprocess, load_dataset("digits"), 360)
    assert top1_agreement(qat.onnx_path, qat.model, images) >= 0.98
    # And the integer kernels compute what the graph says: with 8-bit activations, 97.8% on an AVX2 CPU.
    assert integer_kernel_agreement(qat.onnx_path, images.numpy()) >= 0.99
    session = onnxruntime.InferenceSession(str(qat.onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": images[:8].numpy()})
    assert logits.shape == (8, 10)  # dynamic batch axis
    with torch.no_grad():
        expected = qat.model(images[:8]).numpy()
    assert np.abs(logits - expected).max() < 0.5 * np.abs(expected).max()


@pytest.mark.slow
def test_batch_norm_folding_for_export_is_exact(tiny_run):
    model, meta = load_model(tiny_run / "best.pt")
    prepared = prepare(model, meta)
    images = validation_images(meta.preprocess, load_dataset("digits"), 64)
    prepared.eval()
    with torch.no_grad():
        prepared(images)  # observers calibrate on real images, then freeze
    prepared.apply(torch.ao.quantization.disable_observer)
    folded = fold_batch_norms(prepared)
    assert not any("Bn" in type(m).__name__ for m in folded.modules())
    with torch.no_grad():
        got, expected = folded(images), prepared(images)
    # Same arithmetic up to float rounding, which can move a value across a quantization step now and then.
    assert torch.isclose(got, expected, atol=1e-4).float().mean() > 0.95
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.98


@pytest.mark.slow
def test_qat_keeps_accuracy_and_the_exported_file_scores_like_pytorch(qat, tiny_run):
    data = validation_data(read_onnx_meta(qat.onnx_path).with_dataset("digits"))
    onnx_top1 = evaluate(qat.onnx_path, data).top1
    fp32_top1 = evaluate(tiny_run / "model.onnx", data).top1
    assert abs(onnx_top1 - qat.val_accuracy) <= 0.02
    assert onnx_top1 >= fp32_top1 - 0.05


@pytest.mark.slow
def test_metadata_is_kept_and_publish_accepts_the_file(qat, tiny_run, tmp_path):
    metadata = _metadata(onnx.load(str(qat.onnx_path)))
    fp32 = _metadata(onnx.load(str(tiny_run / "model.onnx")))
    for key in ("preprocess", "labels", "dataset", "arch"):
        assert metadata[key] == fp32[key]
    assert metadata["precision"] == "int8" and metadata["quantization"] == "qat"
    assert json.loads(metadata["qat"])["epochs"] == 1
    published = publish(qat.onnx_path, tmp_path / "repo", "digits")
    assert published.version == 1 and (published.version_dir / "model.onnx").is_file()
    lineage = json.loads((published.version_dir / "build.json").read_text())
    assert lineage["onnx_metadata"]["quantization"] == "qat"


@pytest.mark.slow
def test_cli_quantize_method_qat(tiny_run, tmp_path, capsys):
    output = tmp_path / "cli-qat.onnx"
    code = main(
        [
            "quantize",
            "--method",
            "qat",
            "--checkpoint",
            str(tiny_run / "best.pt"),
            "--output",
            str(output),
            "--qat-epochs",
            "0.2",
            "--qat-lr",
            "5e-5",
        ]
    )
    assert code == 0 and output.is_file()
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "qat" and printed["epochs"] == 0.2 and printed["onnx_agreement"] >= 0.98


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "qat", "--checkpoint", "{missing}"], "does not exist"),
        (["--method", "qat", "--onnx", "{onnx}"], "give --checkpoint"),
        (["--method", "qat", "--checkpoint", "{best}", "--qat-epochs", "0"], "epochs must be more than 0"),
        (["--method", "qat", "--checkpoint", "{best}", "--qat-lr", "-1"], "learning rate must be more than 0"),
        (["--method", "qat", "--checkpoint", "{best}", "--precision", "fp16"], "writes INT8"),
        (["--checkpoint", "{best}"], "give --onnx"),
    ],
)
@pytest.mark.slow
def test_bad_qat_input_is_a_one_line_error_with_exit_code_2(argv, message, tiny_run, tmp_path, capsys):
    paths = {"missing": tmp_path / "nope.pt", "onnx": tiny_run / "model.onnx", "best": tiny_run / "best.pt"}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    assert main(["quantize", *argv, "--output", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("builder quantize: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_missing_checkpoint_and_unsupported_architecture_raise_builder_errors(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        quantization_aware_train(tmp_path / "missing.pt", tmp_path / "x.onnx", ONE_EPOCH)
    model, meta = load_model(tiny_run / "best.pt")
    with pytest.raises(QATError, match="architecture 'vit_b_16' is not supported by QAT"):
        prepare(model, meta.replace(arch="vit_b_16"))


@pytest.mark.slow
def test_an_export_that_disagrees_with_pytorch_is_not_written(tiny_run, tmp_path):
    from builder.qat import export_qat

    model, meta = load_model(tiny_run / "best.pt")
    prepared = prepare(model, meta)
    images = validation_images(meta.preprocess, load_dataset("digits"), 32)
    prepared.eval()
    with torch.no_grad():
        prepared(images)
    prepared.apply(torch.ao.quantization.disable_observer)
    with pytest.raises(QATError, match="agrees with the fake-quantized PyTorch model on only"):
        # No model agrees on more than 100% of images: the check must refuse.
        export_qat(prepared, meta, tmp_path / "x.onnx", parity=images, metadata={}, min_agreement=1.01)
    assert list(tmp_path.iterdir()) == []
