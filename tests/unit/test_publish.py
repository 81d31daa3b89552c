"""Publishing a model: a classifier exported by its owner with a plain `torch.onnx.export(model, args, path)`
call: PyTorch's default (dynamo) exporter, which needs onnxscript and writes the weights to a `.data` file
beside the model."""

import numpy as np
import onnxruntime as ort
import torch

from builder import model_config
from server.preprocess import PreprocessSpec


def _classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).eval()


def test_a_plain_torch_onnx_export_is_published_self_contained(tmp_path, capsys):
    from builder.cli import main

    model, example = _classifier(), torch.rand(1, 3, 32, 32)
    exported = tmp_path / "export" / "model.onnx"
    exported.parent.mkdir()
    torch.onnx.export(model, (example,), str(exported))
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    repository = tmp_path / "repo"
    assert (
        main(
            [
                "publish",
                "--onnx",
                str(exported),
                "--name",
                "mine",
                "--labels",
                str(tmp_path / "labels.txt"),
                "--resize",
                "32",
                "--crop",
                "32",
                "--repository",
                str(repository),
            ]
        )
        == 0
    ), capsys.readouterr().err
    version = repository / "mine" / "1"
    # Triton's backend gets model.onnx alone: the weights must be inside it.
    assert sorted(p.name for p in version.iterdir()) == ["build.json", "model.onnx", "model.py"]
    config = model_config.parse((repository / "mine" / "config.pbtxt").read_text())
    # Exported without a batch axis: a fixed batch of 1, published unbatched with the batch in its dims.
    assert config.max_batch_size == 0 and config.inputs[0].dims == (1, 3, 32, 32)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(served, model(example).numpy(), atol=1e-5)


def test_a_named_batch_axis_serves_several_images_at_once(tmp_path):
    from builder.publish import publish

    model = _classifier()
    exported = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(exported), dynamic_shapes=({0: "batch"},))
    published = publish(
        exported,
        tmp_path / "repo",
        "mine",
        labels=["cat", "dog", "bird"],
        spec=PreprocessSpec(32, 32, (0.5,) * 3, (0.25,) * 3),
    )
    session = ort.InferenceSession(str(published.version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.rand(5, 3, 32, 32)
    (served,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(served, model(batch).numpy(), atol=1e-5)


def _publish_gpu(onnx_path, repository, name="m"):
    from builder.publish import PublishSettings, publish

    spec = PreprocessSpec(image_size=4, resize_size=4, mean=(0.5,), std=(0.5,), color_mode="L")
    publish(onnx_path, repository, name, spec=spec, settings=PublishSettings(target="gpu"))
    (accelerator,) = model_config.parse((repository / name / "config.pbtxt").read_text()).gpu_accelerators
    return accelerator.parameters


def test_a_fixed_batch_model_for_the_gpu_gets_no_profile_of_the_wrong_rank(tmp_path):
    from tests.onnx_variants import conv_classifier, with_fixed_batch

    fixed = with_fixed_batch(conv_classifier(tmp_path / "float.onnx"), tmp_path / "fixed.onnx", 1)
    parameters = _publish_gpu(fixed, tmp_path / "repo")
    config = model_config.parse((tmp_path / "repo" / "m" / "config.pbtxt").read_text())
    assert config.max_batch_size == 0 and config.inputs[0].dims == (1, 1, 4, 4)
    # Every dimension is fixed: no profile (one would have read input:1x1x1x4x4, a 5-D shape for a 4-D input).
    assert not [key for key in parameters if key.startswith("trt_profile_")], parameters


def test_int8_qdq_in_tensorrt_form_is_served_with_int8_kernels(tmp_path):
    from tests.onnx_variants import conv_classifier

    parameters = _publish_gpu(conv_classifier(tmp_path / "int8.onnx", np.int8(0)), tmp_path / "repo", "int8")
    assert parameters["precision_mode"] == "INT8"
    # A Q/DQ model takes no calibration table (ONNX Runtime refuses the session with one).
    assert not [key for key in parameters if "calibration" in key]
    assert (
        _publish_gpu(conv_classifier(tmp_path / "float.onnx"), tmp_path / "repo", "float")["precision_mode"] == "FP16"
    )


def test_onnx_runtime_uint8_qdq_for_the_gpu_is_refused_in_one_line(tmp_path, capsys):
    from builder.cli import main
    from tests.onnx_variants import conv_classifier

    uint8 = conv_classifier(tmp_path / "uint8.onnx", np.uint8(128))
    repository = tmp_path / "repo"
    arguments = ["publish", "--onnx", str(uint8), "--name", "m", "--repository", str(repository), "--target", "gpu"]
    flags = ["--resize", "4", "--crop", "4", "--mean", "0.5", "--std", "0.5", "--color-mode", "L"]
    capsys.readouterr()
    assert main([*arguments, *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "builder quantize --target gpu" in line and "uint8" in line
    assert not repository.exists() or not any(repository.iterdir())
