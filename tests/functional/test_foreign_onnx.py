"""A model trained elsewhere through the whole chain: torchvision's ResNet-18, exported with torch.onnx.export
itself (random weights, 64 x 64 inputs), built with `builder build --onnx --dataset` and the preprocessing
flags into a published INT8 model, which the real Triton serves through the gateway with the preprocessing and
labels given on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from builder.cli import main
from builder.evaluate import evaluate, validation_data
from builder.onnx_meta import read_onnx_meta
from client import classify

from .conftest import start_gateway, start_triton

CLASSES = ("amber", "cobalt", "jade")  # in folder-name order: output i is the i-th class folder
COLORS = ((200, 120, 30), (40, 60, 200), (40, 170, 90))
PER_CLASS = 12
FLAGS = ["--resize", "72", "--crop", "64", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


def _image_folder(root: Path) -> Path:
    """PNGs of noisy colour fields larger than the crop, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for name, color in zip(CLASSES, COLORS):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.clip(np.asarray(color) + rng.normal(0, 40, (80, 96, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _resnet18_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    # The exporter's own defaults (dynamo, weights in a file beside the graph), not `builder export`.
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamic_shapes=({0: "batch"},))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("foreign")
    onnx_path = _resnet18_onnx(root / "resnet18.onnx")
    assert not read_onnx_meta(onnx_path).props  # nothing of ours in it
    args = [
        "build",
        "--onnx",
        str(onnx_path),
        "--dataset",
        str(_image_folder(root / "images")),
        "--calibration-images",
        "16",
        "--name",
        "resnet18",
        "--out",
        str(root / "build"),
        "--repository",
        str(root / "repository"),
        *FLAGS,
    ]
    assert main(args) == 0
    return {"out": root / "build", "repository": root / "repository"}


def test_the_build_reports_the_float_and_int8_stages_and_publishes_the_int8_model(built):
    report = json.loads((built["out"] / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["fp32", "int8"]
    assert report["stages"][0]["macs"] > 0 and report["stages"][0]["parameters"] > 11_000_000
    assert [entry["stage"] for entry in report["not_run"]] == ["pruned"]
    published = json.loads((built["out"] / "published.json").read_text())
    assert published["version"] == 1
    assert (built["repository"] / "resnet18" / "labels.txt").read_text().split() == list(CLASSES)


def test_the_published_int8_model_answers_through_the_gateway_as_onnx_runtime_does(built, tmp_path):
    int8 = built["out"] / "int8.onnx"
    meta = read_onnx_meta(int8)
    assert meta.props["precision"] == "int8" and meta.classes == CLASSES
    data = validation_data(meta)
    direct = evaluate(int8, data).predictions

    triton = start_triton(built["repository"], tmp_path / "triton-cache")
    try:
        gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log", triton.http_url)
        try:
            model = httpx.get(f"{gateway.url}/v1/models/resnet18", timeout=10).json()
            answer = classify([Path(p) for p in data.split.images], model="resnet18", url=gateway.url, top_k=1)
        finally:
            gateway.stop()
    finally:
        triton.stop()
    assert model["preprocessing"]["image_size"] == 64 and model["preprocessing"]["resize_size"] == 72
    assert model["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and model["labels"] == list(CLASSES)
    served = [result["predictions"][0] for result in answer["results"]]
    assert len(served) == len(data) == 8  # 20% of 36, rounded up
    np.testing.assert_array_equal([p["index"] for p in served], direct)
    assert [p["label"] for p in served] == [CLASSES[i] for i in direct]
