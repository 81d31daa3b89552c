"""The INT8 model from `builder quantize`, loaded into an explicit-mode Triton by `builder publish`,
answers through the gateway with the same top-1 as ONNX Runtime run directly, on every validation image."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from builder.evaluate import evaluate, validation_data
from builder.onnx_meta import read_onnx_meta
from builder.publish import PublishSettings, publish
from builder.quantize import QuantizeConfig, quantize_int8
from client import classify
from server.settings import Settings

from .conftest import start_gateway, start_triton

MODEL = "digits_int8"
REQUEST_IMAGES = Settings.model_fields["max_images_per_request"].default  # the gateway's limit


@pytest.fixture(scope="module")
def int8_onnx(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "int8.onnx"
    return quantize_int8(tiny_run / "model.onnx", output, QuantizeConfig(calibration_images=128)).onnx_path


@pytest.fixture(scope="module")
def explicit_triton(tmp_path_factory):
    repository = tmp_path_factory.mktemp("int8_repository")
    server = start_triton(repository, tmp_path_factory.mktemp("triton-cache"), model_control_mode="explicit")
    yield server, repository
    server.stop()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")  # lossless: the gateway decodes exactly these pixels
    return buffer.getvalue()


def test_published_int8_model_is_loaded_through_the_repository_api_and_matches_onnx_runtime_on_every_image(
    int8_onnx, explicit_triton, tmp_path
):
    triton, repository = explicit_triton
    published = publish(int8_onnx, repository, MODEL, settings=PublishSettings(triton_url=triton.http_url))
    ready = httpx.get(f"http://{triton.http_url}/v2/models/{MODEL}/versions/{published.version}/ready", timeout=10)
    assert ready.status_code == 200

    data = validation_data(read_onnx_meta(int8_onnx).with_dataset("digits"))
    direct = evaluate(int8_onnx, data).predictions

    gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log", triton.http_url)
    try:
        served = []
        images = [_png(data.split.image(i, data.color_mode)) for i in range(len(data))]
        for start in range(0, len(images), REQUEST_IMAGES):
            answer = classify(images[start : start + REQUEST_IMAGES], model=MODEL, url=gateway.url, top_k=1)
            assert answer["version"] == str(published.version)
            served += [result["predictions"][0]["index"] for result in answer["results"]]
    finally:
        gateway.stop()
    assert len(served) == len(data) == 360
    np.testing.assert_array_equal(np.asarray(served), direct)
