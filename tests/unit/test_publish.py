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
