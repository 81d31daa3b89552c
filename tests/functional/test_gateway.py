"""The gateway's contract beyond the basics: inputs, versions, KServe v2, limits, keys, metrics, docs."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from builder.publish import PublishSettings, publish
from client import classify, classify_grpc
from server.settings import Settings
from stack.launcher import free_port

from .conftest import MODEL, PIXEL_MODEL, QuickStopTriton, metric, start_gateway, start_triton
from .test_failures import wait_for


def encoded(mode: str, fmt: str, size=(12, 9), **save) -> bytes:
    buffer = io.BytesIO()
    color = {
        "L": 90,
        "RGB": (200, 30, 60),
        "RGBA": (20, 200, 60, 128),
        "CMYK": (10, 20, 30, 0),
        "P": 3,
        "LA": (90, 200),
    }[mode]
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=30, **kwargs)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("RGB", "JPEG"),
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_accepted_formats_and_modes_are_classified_as_onnx_runtime_scores_them(gateway, tiny_run, mode, fmt):
    data = encoded(mode, fmt)
    response = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify?top_k=10",
        content=data,
        headers={"Content-Type": f"image/{fmt.lower()}"},
    )
    assert response.status_code == 200, response.text
    # The reference: the decoded image composited on white and made gray by PIL alone. Every image here
    # is one color, so resizing keeps that gray level and the model sees one value everywhere.
    decoded = Image.open(io.BytesIO(data))
    if decoded.mode in ("RGBA", "LA") or (decoded.mode == "P" and "transparency" in decoded.info):
        rgba = decoded.convert("RGBA")
        decoded = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    gray = np.asarray(decoded.convert("L"), np.float64)
    assert gray.min() == gray.max()
    metadata = {p.key: p.value for p in onnx.load(str(tiny_run / "model.onnx")).metadata_props}
    spec = json.loads(metadata["preprocess"])
    value = (gray[0, 0] / 255 - spec["mean"][0]) / spec["std"][0]
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.full((1, 1, 8, 8), value, np.float32)})
    expected = np.exp(logits[0] - logits[0].max())
    expected /= expected.sum()
    (result,) = response.json()["results"]
    scores = {p["index"]: p["score"] for p in result["predictions"]}
    np.testing.assert_allclose([scores[i] for i in range(10)], expected, rtol=1e-4, atol=1e-6)


def test_formats_outside_the_accepted_list_are_refused(gateway):
    # Declared as what it is: an unsupported media type, refused before it is read.
    response = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify",
        content=encoded("RGB", "TIFF"),
        headers={"Content-Type": "image/tiff"},
    )
    assert response.status_code == 415 and "image/tiff" in response.json()["error"]["message"]
    # Declared as an accepted type or as plain bytes: the decoder opens only the accepted formats.
    for declared in ("image/png", "application/octet-stream"):
        response = post(
            gateway.url,
            f"/v1/models/{MODEL}/classify",
            content=encoded("RGB", "TIFF"),
            headers={"Content-Type": declared},
        )
        assert response.status_code == 400 and "accepted format" in response.json()["error"]["message"]


def test_json_base64_multipart_and_raw_bodies_give_the_same_answer(gateway, photos):
    data = [p.read_bytes() for p in photos[:2]]
    as_json = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify",
        json={
            "images": [
                base64.b64encode(data[0]).decode(),
                "data:image/png;base64," + base64.b64encode(data[1]).decode(),
            ]
        },
    )
    as_multipart = classify(photos[:2], model=MODEL, url=gateway.url)
    assert as_json.status_code == 200
    assert as_json.json()["results"] == as_multipart["results"]
    raw = post(gateway.url, f"/v1/models/{MODEL}/classify", content=data[0], headers={"Content-Type": "image/jpeg"})
    assert raw.json()["results"][0] == as_multipart["results"][0]


@pytest.mark.parametrize("body", [{"images": []}, {"images": ["%%%"]}, {"images": [3]}, ["x"], {"pictures": []}])
def test_bad_json_bodies_are_400(gateway, body):
    response = post(gateway.url, f"/v1/models/{MODEL}/classify", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_grpc_client_and_gateway_give_the_same_predictions(gateway, triton, photos):
    over_http = classify(photos, model=MODEL, url=gateway.url, top_k=3)
    over_grpc = classify_grpc(photos, model=MODEL, url=triton.grpc_url, top_k=3)
    assert over_grpc["version"] == over_http["version"]
    for a, b in zip(over_http["results"], over_grpc["results"]):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]], rtol=1e-5
        )


def test_a_gateway_that_reaches_triton_over_http_answers_as_over_grpc(gateway, triton, photos, tmp_path):
    over_http = start_gateway(
        triton.grpc_url, tmp_path / "gateway-http.log", triton.http_url, GATEWAY_TRITON_PROTOCOL="http"
    )
    try:
        for model in (MODEL, PIXEL_MODEL):
            expected = classify(photos, model=model, url=gateway.url, top_k=3)["results"]
            assert classify(photos, model=model, url=over_http.url, top_k=3)["results"] == expected
        # Registered over HTTP too: the inputs went through shared memory.
        assert metric(over_http.url, "gateway_triton_inputs_total", transport="shared_memory") == 2
        assert httpx.get(f"{over_http.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{over_http.url}/v1/models/{MODEL}", timeout=10).json()["statistics"] is not None
        missing = post(
            over_http.url,
            "/v1/models/absent/classify",
            content=photos[0].read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    finally:
        over_http.stop()


def test_a_model_that_takes_pixels_answers_as_the_float_model_through_the_gateway_and_grpc(gateway, triton, photos):
    floats = classify(photos, model=MODEL, url=gateway.url, top_k=3)
    pixels = classify(photos, model=PIXEL_MODEL, url=gateway.url, top_k=3)
    pixels_over_grpc = classify_grpc(photos, model=PIXEL_MODEL, url=triton.grpc_url, top_k=3)
    for a, b, c in zip(floats["results"], pixels["results"], pixels_over_grpc["results"]):
        assert (
            [p["index"] for p in a["predictions"]]
            == [p["index"] for p in b["predictions"]]
            == [p["index"] for p in c["predictions"]]
        )
        np.testing.assert_allclose(
            [p["score"] for p in b["predictions"]], [p["score"] for p in a["predictions"]], rtol=1e-4
        )
        np.testing.assert_allclose(
            [p["score"] for p in c["predictions"]], [p["score"] for p in b["predictions"]], rtol=1e-5
        )
    assert httpx.get(f"{gateway.url}/v1/models/{PIXEL_MODEL}", timeout=10).json()["input_datatype"] == "UINT8"
    metadata = httpx.get(f"{gateway.url}/v2/models/{PIXEL_MODEL}", timeout=10).json()
    assert (metadata["inputs"][0]["datatype"], metadata["inputs"][0]["shape"]) == ("UINT8", [-1, 8, 8, 1])


def test_request_id_is_echoed_or_made(gateway):
    png = encoded("L", "PNG")
    given = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify",
        content=png,
        headers={"Content-Type": "image/png", "X-Request-ID": "abc-123"},
    )
    assert given.headers["x-request-id"] == "abc-123"
    made = post(gateway.url, f"/v1/models/{MODEL}/classify", content=png, headers={"Content-Type": "image/png"})
    assert len(made.headers["x-request-id"]) == 32
    unsafe = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify",
        content=png,
        headers={"Content-Type": "image/png", "X-Request-ID": "a b\tc" * 40},
    )
    # An unsafe one is replaced by a fresh id, not cleaned up or cut short.
    assert re.fullmatch("[0-9a-f]{32}", unsafe.headers["x-request-id"])
    assert unsafe.headers["x-request-id"] != made.headers["x-request-id"]
    assert "abc-123" in gateway.log_path.read_text()


def test_pinned_version_is_served_and_an_unknown_one_is_404(gateway):
    png = encoded("L", "PNG")
    ok = post(gateway.url, f"/v1/models/{MODEL}/classify?version=1", content=png, headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and ok.json()["version"] == "1"
    missing = post(
        gateway.url, f"/v1/models/{MODEL}/classify?version=9", content=png, headers={"Content-Type": "image/png"}
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = post(
        gateway.url, f"/v1/models/{MODEL}/classify?version=latest", content=png, headers={"Content-Type": "image/png"}
    )
    assert bad.status_code == 422


def test_model_details_include_triton_statistics(gateway):
    details = httpx.get(f"{gateway.url}/v1/models/{MODEL}", timeout=10).json()
    assert details["preprocessing"]["image_size"] == 8 and len(details["labels"]) == 10
    assert details["statistics"]["model_stats"][0]["name"] == MODEL
    assert httpx.get(f"{gateway.url}/v1/models/nope", timeout=10).status_code == 404


def test_kserve_v2_metadata_and_tensor_inference_pass_through(gateway):
    metadata = httpx.get(f"{gateway.url}/v2/models/{MODEL}", timeout=10).json()
    assert metadata["inputs"][0]["name"] == "input" and metadata["outputs"][0]["name"] == "logits"
    assert httpx.get(f"{gateway.url}/v2/models/{MODEL}/versions/1", timeout=10).status_code == 200
    request = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 128}]}
    answer = post(gateway.url, f"/v2/models/{MODEL}/infer", json=request)
    assert answer.status_code == 200
    (output,) = answer.json()["outputs"]
    assert output["name"] == "logits" and output["shape"] == [2, 10]
    wrong = post(
        gateway.url,
        f"/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
    )
    assert wrong.status_code == 400 and "error" in wrong.json()
    assert httpx.get(f"{gateway.url}/v2/models/nope", timeout=10).status_code == 404


def test_repository_api_is_not_reachable_through_the_gateway(gateway):
    for path in ("/v2/repository/index", f"/v2/repository/models/{MODEL}/unload"):
        assert post(gateway.url, path, json={}).status_code == 404


def _has_example(media: dict) -> bool:
    return "example" in media or bool(media.get("examples"))


def test_openapi_has_an_example_on_every_endpoint_and_docs_render(gateway):
    spec = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            # An example of the answer, not of a path parameter: every endpoint shows what it returns.
            answers = operation["responses"]["200"].get("content", {})
            assert any(_has_example(media) for media in answers.values()), f"{method.upper()} {path}: no answer"
            if "requestBody" in operation:
                bodies = operation["requestBody"]["content"]
                assert any(_has_example(media) for media in bodies.values()), f"{method.upper()} {path}: no body"
    assert httpx.get(f"{gateway.url}/docs", timeout=10).status_code == 200


def test_metrics_count_rejections_by_reason_and_observe_images_and_bytes(gateway):
    def observed() -> dict[str, float]:
        names = (
            "gateway_images_per_request_count",
            "gateway_images_per_request_sum",
            "gateway_request_bytes_count",
            "gateway_request_bytes_sum",
        )
        return {name: metric(gateway.url, name) for name in names} | {
            "invalid": metric(gateway.url, "gateway_rejections_total", reason="invalid_image") or 0.0
        }

    before = observed()
    post(gateway.url, f"/v1/models/{MODEL}/classify", content=b"junk", headers={"Content-Type": "image/png"})
    files = [("image", (f"{i}.png", encoded("L", "PNG"), "image/png")) for i in range(3)]
    sent = httpx.Request("POST", f"{gateway.url}/v1/models/{MODEL}/classify", files=files)
    body = sent.read()
    assert httpx.Client(timeout=30).send(sent).status_code == 200
    after = observed()
    assert after["invalid"] == before["invalid"] + 1
    # Both requests are sized and their images counted: the junk body is one image that did not decode.
    assert after["gateway_request_bytes_count"] == before["gateway_request_bytes_count"] + 2
    assert after["gateway_request_bytes_sum"] == before["gateway_request_bytes_sum"] + len(b"junk") + len(body)
    assert after["gateway_images_per_request_count"] == before["gateway_images_per_request_count"] + 2
    assert after["gateway_images_per_request_sum"] == before["gateway_images_per_request_sum"] + 1 + 3


def preprocessed(url: str, where: str) -> float:
    return metric(url, "gateway_preprocessing_total", where=where) or 0.0


def preprocessed_counts(url: str) -> dict[str, float]:
    return {where: preprocessed(url, where) for where in ("event_loop", "thread_pool")}


@contextlib.contextmanager
def request_in_flight(url: str, content_type: str = "image/jpeg"):
    """A classification whose body never comes: the gateway counts it in flight until the socket closes."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as held:
        held.sendall(
            f"POST /v1/models/{MODEL}/classify HTTP/1.1\r\nHost: gateway\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        assert wait_for(lambda: metric(url, "gateway_in_flight_requests") == 1)
        yield
    assert wait_for(lambda: metric(url, "gateway_in_flight_requests") == 0)


def test_a_small_request_alone_is_preprocessed_on_the_event_loop_and_answered_as_by_the_pool(gateway, photos):
    before = preprocessed_counts(gateway.url)
    alone = classify(photos[2:3], model=MODEL, url=gateway.url, top_k=5)
    assert preprocessed(gateway.url, "event_loop") == before["event_loop"] + 1
    with request_in_flight(gateway.url):
        crowded = classify(photos[2:3], model=MODEL, url=gateway.url, top_k=5)
    assert preprocessed(gateway.url, "thread_pool") == before["thread_pool"] + 1
    assert crowded == alone
    assert preprocessed(gateway.url, "event_loop") == before["event_loop"] + 1


@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=x", "application/json"])
def test_a_client_that_hangs_up_mid_body_is_counted_as_499_not_as_an_internal_error(gateway, content_type):
    def rejected(reason: str) -> float:
        return metric(gateway.url, "gateway_rejections_total", reason=reason) or 0.0

    internal, gone = rejected("internal_error"), rejected("client_disconnected")
    with request_in_flight(gateway.url, content_type):
        pass
    assert wait_for(lambda: rejected("client_disconnected") == gone + 1)
    assert rejected("internal_error") == internal


def jpeg(size: tuple[int, int], noise: bool = False, **save) -> bytes:
    pixels = (
        np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        if noise
        else np.full((size[1], size[0], 3), 120, dtype=np.uint8)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, status",
    [
        pytest.param(jpeg((800, 700)), 200, id="over the pixel limit"),  # 560,000 pixels in a few KB
        pytest.param(jpeg((400, 300), noise=True, quality=100), 200, id="over the byte limit"),
        pytest.param(jpeg((64, 48), progressive=True), 200, id="a progressive JPEG"),
        pytest.param(encoded("RGB", "PNG"), 200, id="not a JPEG"),
        pytest.param(b"\xff\xd8 not a jpeg", 400, id="an unreadable header"),
    ],
)
def test_a_request_alone_that_is_not_a_small_baseline_jpeg_goes_to_the_thread_pool(gateway, body, status):
    before = preprocessed_counts(gateway.url)
    response = post(gateway.url, f"/v1/models/{MODEL}/classify", content=body, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == status, response.text
    assert preprocessed(gateway.url, "thread_pool") == before["thread_pool"] + 1
    assert preprocessed(gateway.url, "event_loop") == before["event_loop"]


def test_a_broken_jpeg_preprocessed_on_the_event_loop_is_a_400_and_frees_its_slot(gateway, photos):
    free = metric(gateway.url, "gateway_shared_memory_free_slots")
    before = preprocessed(gateway.url, "event_loop")
    # Its header is whole, so it looks quick to decode; the pixels after it are missing.
    response = post(
        gateway.url,
        f"/v1/models/{MODEL}/classify",
        content=photos[2].read_bytes()[:2000],
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"
    assert preprocessed(gateway.url, "event_loop") == before + 1
    assert metric(gateway.url, "gateway_shared_memory_free_slots") == free


@pytest.fixture(scope="module")
def limited_gateway(triton, tmp_path_factory):
    process = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("limited") / "gateway.log",
        GATEWAY_MAX_BODY_BYTES="4000",
        GATEWAY_MAX_IMAGES_PER_REQUEST="2",
        GATEWAY_MAX_IMAGE_PIXELS="10000",
        GATEWAY_API_KEYS="key-one,key-two",
    )
    yield process
    process.stop()


def test_limits_on_body_pixels_and_image_count_are_413(limited_gateway):
    auth = {"Authorization": "Bearer key-one"}
    url = f"/v1/models/{MODEL}/classify"
    big_body = post(limited_gateway.url, url, content=b"\xff" * 5000, headers={"Content-Type": "image/png", **auth})
    assert big_body.status_code == 413
    many_pixels = post(
        limited_gateway.url,
        url,
        content=encoded("L", "PNG", size=(200, 200)),
        headers={"Content-Type": "image/png", **auth},
    )
    assert many_pixels.status_code == 413 and "pixels" in many_pixels.json()["error"]["message"]
    files = [("image", (f"{i}.png", encoded("L", "PNG"), "image/png")) for i in range(3)]
    too_many = post(limited_gateway.url, url, files=files, headers=auth)
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "payload_too_large"


def test_api_keys_guard_models_but_not_health_and_are_never_logged(limited_gateway):
    url = f"/v1/models/{MODEL}/classify"
    png = encoded("L", "PNG")
    assert post(limited_gateway.url, url, content=png, headers={"Content-Type": "image/png"}).status_code == 401
    wrong = post(
        limited_gateway.url,
        url,
        content=png,
        headers={"Content-Type": "image/png", "Authorization": "Bearer key-three"},
    )
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    for key in ("key-one", "key-two"):
        right = post(
            limited_gateway.url,
            url,
            content=png,
            headers={"Content-Type": "image/png", "Authorization": f"Bearer {key}"},
        )
        assert right.status_code == 200
    for open_path in ("/healthz", "/readyz"):
        assert httpx.get(f"{limited_gateway.url}{open_path}", timeout=10).status_code == 200
    assert httpx.get(f"{limited_gateway.url}/metrics", timeout=10).status_code == 401  # by default, with keys
    assert httpx.get(f"{limited_gateway.url}/v1/models", timeout=10).status_code == 401
    log = limited_gateway.log_path.read_text()
    assert "key-one" not in log and "key-two" not in log and "key-three" not in log


@pytest.fixture(scope="module")
def slow_stack(tiny_run, tmp_path_factory):
    """A model whose batcher holds requests for six seconds in a queue of one: full queues on demand. Six,
    not fewer: a test sees the first request held, then sends the next, and on two loaded cores that can take
    seconds; the first must still be queued (a gateway waits 10 s for it, so not more)."""
    folder = tmp_path_factory.mktemp("slow")
    publish(
        tiny_run / "model.onnx",
        folder / "repo",
        "slow",
        settings=PublishSettings(
            max_batch_size=32, preferred_batch_sizes=(32,), max_queue_delay_us=6_000_000, max_queue_size=1
        ),
    )
    server = start_triton(folder / "repo", folder / "cache")
    yield server, folder
    server.stop()


def triton_pending(server, model: str = "slow") -> float:
    """Requests Triton holds for `model`, queued or executing (its own gauge)."""
    for line in httpx.get(server.metrics_url, timeout=10).text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.rpartition(" ")[2])
    return 0.0


@contextlib.contextmanager
def held_by_triton(gateway_url: str, server):
    """One classification sent in a thread and held in the slow model's queue: Triton's own gauge says
    when it is there, so no timing is guessed. Yields the thread's response list (filled once answered)."""
    answered: list[httpx.Response] = []
    # An earlier test's request, abandoned by its gateway, can still be in Triton's queue of one.
    assert wait_for(lambda: triton_pending(server) == 0, 30)
    sender = threading.Thread(
        target=lambda: answered.append(
            post(
                gateway_url,
                "/v1/models/slow/classify",
                content=encoded("L", "PNG"),
                headers={"Content-Type": "image/png"},
            )
        )
    )
    sender.start()
    try:
        assert wait_for(lambda: triton_pending(server) == 1, 15)
        yield answered
    finally:
        sender.join(30)


def test_a_full_triton_queue_becomes_429_with_retry_after(slow_stack):
    server, folder = slow_stack
    gateway = start_gateway(server.grpc_url, folder / "gateway-queue.log", GATEWAY_TRITON_TIMEOUT_S="10")
    try:
        with held_by_triton(gateway.url, server) as first:
            # Four more at once into a queue of one that is full: Triton refuses what it cannot queue. Sent
            # together, not one by one, so a loaded machine that lets the held request go early still leaves
            # at least one to refuse.
            started = time.monotonic()
            with ThreadPoolExecutor(4) as senders:
                answers = list(
                    senders.map(
                        lambda _: post(
                            gateway.url,
                            "/v1/models/slow/classify",
                            content=encoded("L", "PNG"),
                            headers={"Content-Type": "image/png"},
                        ),
                        range(4),
                    )
                )
            seen = [(answer.status_code, round(time.monotonic() - started, 2)) for answer in answers]
            rejected = [answer for answer in answers if answer.status_code == 429]
            assert rejected and all(answer.status_code in (200, 429) for answer in answers), seen
            for answer in rejected:
                assert answer.headers["Retry-After"] and answer.json()["error"]["code"] == "too_many_requests"
        assert first[0].status_code == 200, first[0].text
    finally:
        gateway.stop()


def test_gateway_in_flight_limit_is_429_and_triton_timeout_is_504(slow_stack):
    server, folder = slow_stack
    gateway = start_gateway(
        server.grpc_url, folder / "gateway-limit.log", GATEWAY_MAX_IN_FLIGHT="1", GATEWAY_TRITON_TIMEOUT_S="10"
    )
    try:
        # The one slot is held by a request Triton has queued: the next is refused by the gateway itself.
        with held_by_triton(gateway.url, server) as first:
            refused = post(
                gateway.url,
                "/v1/models/slow/classify",
                content=encoded("L", "PNG"),
                headers={"Content-Type": "image/png"},
            )
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
            assert triton_pending(server) == 1  # it never reached Triton
        assert first[0].status_code == 200, first[0].text
    finally:
        gateway.stop()
    impatient = start_gateway(
        server.grpc_url, folder / "gateway-timeout.log", GATEWAY_MAX_IN_FLIGHT="1", GATEWAY_TRITON_TIMEOUT_S="0.3"
    )
    try:
        assert wait_for(lambda: triton_pending(server) == 0, 30)
        # The batcher holds a lone request for six seconds, twenty times the timeout.
        late = post(
            impatient.url,
            "/v1/models/slow/classify",
            content=encoded("L", "PNG"),
            headers={"Content-Type": "image/png"},
        )
        assert late.status_code == 504 and late.json()["error"]["code"] == "triton_timeout"
    finally:
        impatient.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_triton_holds_past_the_timeout_is_504_over_either_protocol(slow_stack, protocol):
    server, folder = slow_stack
    gateway = start_gateway(
        server.grpc_url,
        folder / f"gateway-timeout-{protocol}.log",
        server.http_url,
        GATEWAY_TRITON_PROTOCOL=protocol,
        GATEWAY_TRITON_TIMEOUT_S="0.3",
    )
    try:
        # The queue holds one request: an earlier test's, abandoned by its gateway but still held by
        # Triton, would make this one a 429 (queue full) instead.
        assert wait_for(lambda: triton_pending(server) == 0, 30)
        # The batcher holds a lone request for six seconds, twenty times the timeout.
        response = post(
            gateway.url, "/v1/models/slow/classify", content=encoded("L", "PNG"), headers={"Content-Type": "image/png"}
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "triton_timeout"
        assert response.headers["Retry-After"]
        # The abandoned call's slot is free again (Triton, still holding the call, only reads it).
        assert (
            metric(gateway.url, "gateway_shared_memory_free_slots")
            == Settings.model_fields["shared_memory_slots"].default
        )
    finally:
        gateway.stop()


def test_triton_repository_and_shared_memory_apis_need_the_key(repository, tmp_path, photos):
    with QuickStopTriton(
        model_repository=repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        cache_dir=tmp_path,
        repository_api_key="s3cret",
    ) as server:
        for api in ("repository/index", "systemsharedmemory/status"):
            url = f"http://{server.http_url}/v2/{api}"
            call = httpx.post if api.startswith("repository") else httpx.get
            assert call(url, timeout=10).status_code in (401, 403)
            assert call(url, headers={"repository-key": "s3cret"}, timeout=10).status_code == 200
        gateway = start_gateway(server.grpc_url, tmp_path / "gateway.log", GATEWAY_TRITON_REPOSITORY_KEY="s3cret")
        try:
            assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
            # The key opens the shared-memory API to the gateway: its region is registered and used.
            # The region may be registered just after the first request; from then on every one uses it.
            assert wait_for(
                lambda: (
                    classify(photos[:1], model=MODEL, url=gateway.url)["results"]
                    and metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory")
                )
            )
            sent = metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory")
            assert len(classify(photos[:2], model=MODEL, url=gateway.url)["results"]) == 2
            assert metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory") == sent + 1
        finally:
            gateway.stop()


def test_proxied_rejections_are_counted_like_any_other(gateway):
    def rejections(reason: str) -> float:
        return metric(gateway.url, "gateway_rejections_total", reason=reason) or 0.0

    before = {reason: rejections(reason) for reason in ("model_not_found", "refused_by_triton")}
    assert httpx.get(f"{gateway.url}/v2/models/nope", timeout=10).status_code == 404
    wrong = post(
        gateway.url,
        f"/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
    )
    assert wrong.status_code == 400
    assert rejections("model_not_found") == before["model_not_found"] + 1
    assert rejections("refused_by_triton") == before["refused_by_triton"] + 1
