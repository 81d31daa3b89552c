"""What the stack exposes, and to whom: Triton's inference API behind its key (the gateway's shared memory
included), readiness without internals beside a broken model, docs and metrics behind the gateway's keys,
the local gateway on loopback, and OpenAPI docs that render offline."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from builder.publish import publish
from client import classify_grpc
from server.shared_memory import SHM_DIRECTORY
from stack.launcher import free_port

from .conftest import MODEL, start_gateway, start_triton
from .test_failures import png, wait_for

TRITON_KEY = "triton-s3cret"
CLIENT_KEY = "client-key"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
V2_REQUEST = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}


@pytest.fixture(scope="module")
def keyed_stack(tiny_run, tmp_path_factory):
    """The local stack's Triton (with its key) on a repository where one model cannot load, and a gateway
    with API keys in front of it."""
    folder = tmp_path_factory.mktemp("exposure")
    repository = folder / "repo"
    publish(tiny_run / "model.onnx", repository, MODEL)
    publish(tiny_run / "model.onnx", repository, "broken")
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"corrupted")
    triton = start_triton(repository, folder / "cache", repository_api_key=TRITON_KEY)
    gateway = start_gateway(
        triton.grpc_url,
        folder / "gateway.log",
        triton.http_url,
        GATEWAY_TRITON_REPOSITORY_KEY=TRITON_KEY,
        GATEWAY_API_KEYS=CLIENT_KEY,
    )
    yield triton, gateway, folder
    gateway.stop()
    triton.stop()


def metric(url: str, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0


def classify_png(url: str, model: str = MODEL) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{model}/classify", content=png(), headers={"Content-Type": "image/png", **AUTH}, timeout=30
    )


# Item: Triton's inference API needs the key.


def test_triton_refuses_inference_without_its_key_over_http_and_grpc(keyed_stack, photos):
    triton, _, _ = keyed_stack
    infer = f"http://{triton.http_url}/v2/models/{MODEL}/infer"
    assert httpx.post(infer, json=V2_REQUEST, timeout=30).status_code in (401, 403)
    assert httpx.post(infer, json=V2_REQUEST, headers={"repository-key": TRITON_KEY}, timeout=30).status_code == 200
    with pytest.raises(RuntimeError, match="restricted"):
        classify_grpc(photos[:1], model=MODEL, url=triton.grpc_url)
    answer = classify_grpc(photos[:1], model=MODEL, url=triton.grpc_url, triton_key=TRITON_KEY)
    assert len(answer["results"]) == 1


def test_the_gateways_region_cannot_be_read_through_triton_without_the_key(keyed_stack):
    triton, gateway, _ = keyed_stack
    # What any local user sees: the region's name in /dev/shm.
    assert wait_for(
        lambda: (
            classify_png(gateway.url).status_code == 200
            and metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory")
        )
    )
    (name,) = [n for n in os.listdir(SHM_DIRECTORY) if n.startswith(f"gateway-{gateway.pid}-")]
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 8, 8],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": name, "shared_memory_byte_size": 256, "shared_memory_offset": 0},
            }
        ]
    }
    stolen = httpx.post(f"http://{triton.http_url}/v2/models/{MODEL}/infer", json=request, timeout=30)
    assert stolen.status_code in (401, 403), stolen.text


def test_the_gateway_sends_the_key_on_every_triton_call(keyed_stack, photos):
    triton, gateway, folder = keyed_stack
    sent = metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory")
    assert classify_png(gateway.url).status_code == 200
    assert metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory") == sent + 1
    # The KServe v2 pass-through goes over HTTP with its own client.
    through = httpx.post(f"{gateway.url}/v2/models/{MODEL}/infer", json=V2_REQUEST, headers=AUTH, timeout=30)
    assert through.status_code == 200 and through.json()["outputs"][0]["shape"] == [1, 10]
    over_http = start_gateway(
        triton.grpc_url,
        folder / "gateway-http.log",
        triton.http_url,
        GATEWAY_TRITON_PROTOCOL="http",
        GATEWAY_TRITON_REPOSITORY_KEY=TRITON_KEY,
        GATEWAY_API_KEYS=CLIENT_KEY,
    )
    try:
        assert classify_png(over_http.url).status_code == 200
    finally:
        over_http.stop()


def test_the_bench_talks_to_a_keyed_triton_directly(keyed_stack, monkeypatch):
    import benchmarks.gateway as bench
    from benchmarks.gateway import triton_direct

    monkeypatch.setattr(bench, "MODEL", MODEL)
    triton, _, _ = keyed_stack
    tensors = [np.full((1, 8, 8), 0.5, np.float32)]
    run = asyncio.run(triton_direct(triton.grpc_url, tensors, 1, 0.3, triton_key=TRITON_KEY))
    assert run.images > 0


# Item: what answers without a key; readiness beside a broken model.


def test_readyz_is_ready_beside_a_broken_model_and_tells_no_internals(keyed_stack):
    _, gateway, folder = keyed_stack
    # Ready once the broken model has failed to load (while it loads, the gateway waits for it).
    assert wait_for(lambda: httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200, 90)
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.json()["status"] == "ready"
    for internal in ("Traceback", str(folder), "/", "broken", "model.onnx"):
        assert internal not in json.dumps(ready.json()), internal


def test_docs_openapi_and_metrics_need_the_key_by_default(keyed_stack):
    _, gateway, _ = keyed_stack
    for path in ("/docs", "/openapi.json", "/metrics"):
        refused = httpx.get(f"{gateway.url}{path}", timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", path
        assert httpx.get(f"{gateway.url}{path}", headers=AUTH, timeout=10).status_code == 200, path
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200


def test_model_load_errors_are_told_behind_the_key(keyed_stack):
    _, gateway, _ = keyed_stack
    assert httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code == 401

    def models() -> dict:
        listed = httpx.get(f"{gateway.url}/v1/models", headers=AUTH, timeout=10).json()["models"]
        return {m["name"]: m for m in listed}

    # One answer is checked whole: Triton retries the broken model while the repository is polled, and
    # between two answers its version can be back to loading, without a reason yet.
    answer: dict = {}

    def failed_with_a_reason() -> bool:
        answer.update(models())
        return bool(answer["broken"]["versions"][0].get("reason"))

    assert wait_for(failed_with_a_reason, 90)
    assert answer[MODEL]["ready"] and not answer["broken"]["ready"]
    assert "model.onnx" in answer["broken"]["versions"][0]["reason"]


def test_required_models_decide_readiness_and_docs_and_metrics_can_be_opened(keyed_stack):
    triton, _, folder = keyed_stack
    common = dict(GATEWAY_TRITON_REPOSITORY_KEY=TRITON_KEY, GATEWAY_API_KEYS=CLIENT_KEY)
    strict = start_gateway(
        triton.grpc_url,
        folder / "gateway-strict.log",
        triton.http_url,
        GATEWAY_REQUIRED_MODELS=f"{MODEL},broken",
        GATEWAY_DOCS_REQUIRE_KEY="false",
        GATEWAY_METRICS_REQUIRE_KEY="false",
        **common,
    )
    try:
        not_ready = httpx.get(f"{strict.url}/readyz", timeout=10)
        assert not_ready.status_code == 503 and not_ready.headers["Retry-After"]
        body = not_ready.json()
        assert body["status"] == "not ready" and set(body) == {"status", "reason"} and len(body["reason"]) < 80
        assert "Traceback" not in body["reason"] and "/" not in body["reason"]
        for path in ("/docs", "/openapi.json", "/metrics"):
            assert httpx.get(f"{strict.url}{path}", timeout=10).status_code == 200, path
        assert httpx.get(f"{strict.url}/v1/models", timeout=10).status_code == 401
    finally:
        strict.stop()
    just_digits = start_gateway(
        triton.grpc_url, folder / "gateway-digits.log", triton.http_url, GATEWAY_REQUIRED_MODELS=MODEL, **common
    )
    try:
        assert httpx.get(f"{just_digits.url}/readyz", timeout=10).status_code == 200
    finally:
        just_digits.stop()


# Item: the local gateway listens on loopback unless told otherwise.


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_make_serve_binds_the_gateway_to_loopback_by_default(repository, tmp_path):
    gateway_port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "GATEWAY_HOST"}
    env.update(
        TRITON_HTTP_PORT=str(free_port()),
        TRITON_GRPC_PORT=str(free_port()),
        TRITON_METRICS_PORT=str(free_port()),
        TRITON_CACHE_DIR=str(tmp_path / "cache"),
        GATEWAY_PORT=str(gateway_port),
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "stack", "--repository", str(repository)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: _listening_addresses(gateway_port), 90)
        assert _listening_addresses(gateway_port) == {"0100007F"}  # 127.0.0.1, and nothing else
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()


# Item: OpenAPI tells each error as it is, and /docs renders without the internet.

EXPECTED_CODES = {
    "400": {"invalid_image", "bad_request"},
    "401": {"unauthorized"},
    "404": {"model_not_found"},
    "413": {"payload_too_large"},
    "415": {"unsupported_media_type"},
    "422": {"invalid_request"},
    "429": {"too_many_requests"},
    "502": {"triton_error"},
    "503": {"triton_unavailable"},
    "504": {"triton_timeout"},
}


def test_openapi_gives_each_error_of_classify_its_own_example_and_our_error_body(gateway):
    spec = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    assert "HTTPValidationError" not in json.dumps(spec)
    classify = spec["paths"]["/v1/models/{name}/classify"]["post"]
    errors = {status: answer for status, answer in classify["responses"].items() if status >= "400"}
    assert set(errors) == set(EXPECTED_CODES)
    for status, answer in errors.items():
        example = answer["content"]["application/json"]["example"]
        assert example["error"]["code"] in EXPECTED_CODES[status], (status, example)
        assert set(example["error"]) == {"code", "message"}
    schema = errors["422"]["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][name]["properties"]) == {"error"}
    assert {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/gif",
        "multipart/form-data",
        "application/json",
    } <= set(classify["requestBody"]["content"])
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path.startswith(("/v1/", "/v2/")):
                assert "401" in operation["responses"], f"{method.upper()} {path} does not document 401"
            for status, answer in operation["responses"].items():
                example = answer.get("content", {}).get("application/json", {}).get("example", {})
                if status >= "400" and "error" in example:
                    code = example["error"]["code"]
                    assert code in EXPECTED_CODES[status], (path, status, code)


def test_docs_load_swagger_ui_from_the_gateway_itself(gateway):
    page = httpx.get(f"{gateway.url}/docs", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and not [a for a in assets if "//" in a], assets
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        fetched = httpx.get(f"{gateway.url}{asset}", timeout=10)
        assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    assert "/openapi.json" in page.text


def test_publish_asks_a_keyed_triton_to_load_with_the_stacks_key(keyed_stack, tiny_run, monkeypatch):
    from builder.errors import PublishError
    from builder.publish import PublishSettings

    triton, _, folder = keyed_stack
    settings = PublishSettings(triton_url=triton.http_url)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(folder / "no-key-here"))
    with pytest.raises(PublishError, match="could not load it"):
        publish(tiny_run / "model.onnx", folder / "repo", "keyed", settings=settings)
    monkeypatch.setenv("TRITON_REPOSITORY_API_KEY", TRITON_KEY)
    # A polling server answers that it finds versions itself: the key was accepted.
    publish(tiny_run / "model.onnx", folder / "repo", "keyed", settings=settings)
