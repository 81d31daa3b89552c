"""A classifier exported with a fixed batch of 1, served by the real Triton behind the gateway: requests of
several images are split into one call per image, concurrent requests all succeed, and no input that
Triton accepts can crash the Python backend (which, before, took Triton and every model down)."""

from __future__ import annotations

import concurrent.futures
import io
import shutil

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from builder import model_config
from builder.publish import PublishSettings, publish
from tests.onnx_variants import with_fixed_batch

from .conftest import start_gateway, start_triton

CONCURRENT = 16


@pytest.fixture(scope="module")
def stack(tiny_run, tmp_path_factory):
    """digits (dynamic batch), fixed and fixed-pixels (batch fixed at 1, as publish writes them now), and
    fixed-legacy: the fixed-batch file under the config that publish used to write (max_batch_size 32)."""
    folder = tmp_path_factory.mktemp("fixed-batch")
    repository = folder / "repository"
    fixed = with_fixed_batch(tiny_run / "model.onnx", folder / "fixed.onnx", 1)
    publish(tiny_run / "model.onnx", repository, "digits")
    publish(fixed, repository, "fixed")
    publish(fixed, repository, "fixed-pixels", settings=PublishSettings(pixel_input=True))
    legacy = publish(tiny_run / "model.onnx", repository, "fixed-legacy")
    shutil.copyfile(fixed, legacy.version_dir / "model.onnx")
    triton = start_triton(repository, folder / "triton-cache")
    gateway = start_gateway(triton.grpc_url, folder / "gateway.log", triton.http_url)
    try:
        yield repository, triton, gateway
    finally:
        gateway.stop()
        triton.stop()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 24), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _assert_alive(triton) -> None:
    assert triton.running(), f"tritonserver died; last lines of its log:\n{triton.log_tail()}"
    assert httpx.get(f"http://{triton.http_url}/v2/health/ready", timeout=5).status_code == 200


def _classify(gateway, model: str, images: list[bytes]) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/models/{model}/classify?top_k=10",
        files=[("image", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)],
        timeout=30,
    )


@pytest.mark.parametrize("model", ["fixed", "fixed-pixels"])
def test_a_fixed_batch_model_is_published_without_batching(stack, model):
    repository, _, _ = stack
    config = model_config.parse((repository / model / "config.pbtxt").read_text())
    assert config.max_batch_size == 0 and config.dynamic_batching.preferred_batch_sizes == ()
    assert config.inputs[0].dims[0] == 1


@pytest.mark.parametrize("model", ["fixed", "fixed-pixels"])
def test_several_images_get_one_result_each_equal_to_the_batching_model(stack, model):
    _, triton, gateway = stack
    images = [_png(seed) for seed in range(5)]
    response = _classify(gateway, model, images)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(images)
    reference = _classify(gateway, "digits", images).json()["results"]
    for got, want in zip(results, reference):
        assert got["predictions"][0]["label"] == want["predictions"][0]["label"]
        np.testing.assert_allclose(
            [p["score"] for p in got["predictions"]], [p["score"] for p in want["predictions"]], atol=1e-4
        )
    _assert_alive(triton)


@pytest.mark.parametrize("model", ["fixed", "fixed-pixels", "fixed-legacy"])
def test_concurrent_single_image_requests_all_succeed_and_triton_lives(stack, model):
    _, triton, gateway = stack
    image = _png(0)

    def one(_: int) -> int:
        return httpx.post(
            f"{gateway.url}/v1/models/{model}/classify",
            content=image,
            headers={"Content-Type": "image/png"},
            timeout=30,
        ).status_code

    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
            statuses = list(pool.map(one, range(CONCURRENT)))
        assert statuses == [200] * CONCURRENT
    _assert_alive(triton)


def _infer(triton, model: str, batch: int) -> str:
    """'ok', or the gRPC status Triton answered with."""
    tensor = grpcclient.InferInput("input", [batch, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((batch, 1, 8, 8), np.float32))
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        try:
            result = client.infer(model, [tensor], client_timeout=30)
        except InferenceServerException as e:
            return f"{e.status()}: {e.message()}"
    assert result.as_numpy("logits").shape == (batch, 10)
    return "ok"


def test_a_wrong_shape_sent_straight_to_triton_is_an_error_not_a_crash(stack):
    _, triton, _ = stack
    assert _infer(triton, "fixed", 1) == "ok"
    assert _infer(triton, "fixed", 2).startswith("StatusCode.INVALID_ARGUMENT")
    _assert_alive(triton)


def test_the_backend_refuses_what_its_onnx_session_cannot_take_and_runs_the_rest(stack):
    """fixed-legacy's config lets Triton batch requests for a model that takes one image: the backend
    answers the two-image requests with an error and runs the others one by one."""
    _, triton, _ = stack
    batches = [1, 2] * CONCURRENT
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda batch: _infer(triton, "fixed-legacy", batch), batches))
    for batch, answer in zip(batches, answers):
        if batch == 1:
            assert answer == "ok"
        else:
            assert answer.startswith("StatusCode.INVALID_ARGUMENT") and "takes" in answer, answer
    _assert_alive(triton)


def test_an_input_the_model_refuses_is_a_400_from_the_gateway(stack):
    _, triton, gateway = stack
    response = _classify(gateway, "fixed-legacy", [_png(0), _png(1)])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    _assert_alive(triton)
