"""End to end: images over HTTP to the gateway, through real Triton, checked against ONNX Runtime."""

from __future__ import annotations

import io
import json
import os
import re

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from client import classify
from server.preprocess import PreprocessSpec, preprocess_bytes

from .conftest import MODEL, PIXEL_MODEL, metric


def triton_inference_count(triton) -> int:
    stats = httpx.get(f"http://{triton.http_url}/v2/models/{MODEL}/stats", timeout=10).json()
    return sum(int(s["inference_count"]) for s in stats["model_stats"])


def test_gateway_top5_equals_onnx_runtime_on_real_photos_and_triton_counts_them(gateway, triton, tiny_run, photos):
    before = triton_inference_count(triton)
    answer = classify(photos, model=MODEL, url=gateway.url, top_k=5)

    metadata = {p.key: p.value for p in onnx.load(str(tiny_run / "model.onnx")).metadata_props}
    spec = PreprocessSpec.from_dict(json.loads(metadata["preprocess"]))
    batch = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in photos])
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": batch})
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)

    assert answer["model"] == MODEL and answer["version"] == "1"
    assert len(answer["results"]) == len(photos)
    for row, result in zip(probabilities, answer["results"]):
        indices = [p["index"] for p in result["predictions"]]
        assert indices == list(np.argsort(-row, kind="stable")[:5])
        np.testing.assert_allclose([p["score"] for p in result["predictions"]], row[indices], rtol=1e-4)
        assert [p["label"] for p in result["predictions"]] == [str(i) for i in indices]
    assert triton_inference_count(triton) - before == len(photos)


def test_each_instance_runs_onnx_runtime_on_its_share_of_the_cores(triton):
    """The default two instances split the cores between them; a single instance takes them all."""
    cores = len(os.sched_getaffinity(0))
    log = triton.log_path.read_text(errors="replace")
    for model, instances in ((MODEL, 2), (PIXEL_MODEL, 1)):
        # Every (re)load of the model logs one line per instance.
        lines = re.findall(
            rf"({re.escape(model)}_\d+_\d+): ONNX Runtime on (\d+) intra-op thread\(s\) "
            rf"\((\d+) instance\(s\), (\d+) usable core\(s\)\)",
            log,
        )
        assert len({name for name, *_ in lines}) == instances, (model, lines)
        for _, threads, counted, usable in lines:
            assert int(counted) == instances and int(usable) <= cores
            assert int(threads) == max(1, int(usable) // instances)


def test_raw_image_body_is_classified(gateway, photos):
    response = httpx.post(
        f"{gateway.url}/v1/models/{MODEL}/classify?top_k=3",
        content=photos[0].read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert response.status_code == 200
    assert [len(r["predictions"]) for r in response.json()["results"]] == [3]


def test_health_readiness_and_model_listing(gateway):
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["models"]
    (digits,) = [m for m in models if m["name"] == MODEL]
    assert digits["ready"] and digits["versions"][0]["state"] == "READY"
    assert digits["preprocessing"]["image_size"] == 8 and digits["preprocessing"]["color_mode"] == "L"


STAGES = ("decode", "preprocess", "inference", "total")


def test_metrics_count_requests_and_time_every_stage(gateway, photos):
    def counted() -> dict[str, float]:
        # The session's gateway has served other tests already: what counts is the change.
        counts = {stage: metric(gateway.url, "gateway_stage_seconds_count", stage=stage) or 0.0 for stage in STAGES}
        counts["ok"] = metric(gateway.url, "gateway_requests_total", model=MODEL, status="200") or 0.0
        counts["images"] = metric(gateway.url, "gateway_images_total", model=MODEL) or 0.0
        return counts

    before = counted()
    classify(photos[:2], model=MODEL, url=gateway.url)
    after = counted()
    assert after == {**{key: value + 1 for key, value in before.items()}, "images": before["images"] + 2}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "request_kwargs, status, code",
    [
        ({"content": b"not an image", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        (
            {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            400,
            "bad_request",
        ),
        ({"files": [("other", ("a.png", _png(), "image/png"))]}, 400, "bad_request"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_json_error(gateway, request_kwargs, status, code):
    response = httpx.post(f"{gateway.url}/v1/models/{MODEL}/classify", timeout=30, **request_kwargs)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_unknown_model_is_404(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/models/nope/classify", content=_png(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_non_numeric_top_k_is_a_4xx(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/models/{MODEL}/classify?top_k=five",
        content=_png(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
