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
from server.client import classify_grpc
from server.launcher import free_port
from server.shared_memory import SHM_DIRECTORY

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
    gateway = start_gateway(triton.grpc_url, folder / "gateway.log", triton.http_url,
                            GATEWAY_TRITON_REPOSITORY_KEY=TRITON_KEY, GATEWAY_API_KEYS=CLIENT_KEY)
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
    return httpx.post(f"{url}/v1/models/{model}/classify", content=png(),
                      headers={"Content-Type": "image/png", **AUTH}, timeout=30)


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
    assert wait_for(lambda: classify_png(gateway.url).status_code == 200 and metric(
        gateway.url, "gateway_triton_inputs_total", transport="shared_memory"))
    (name,) = [n for n in os.listdir(SHM_DIRECTORY) if n.startswith(f"gateway-{gateway.pid}-")]
    request = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {
        "shared_memory_region": name, "shared_memory_byte_size": 256, "shared_memory_offset": 0}}]}
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
    over_http = start_gateway(triton.grpc_url, folder / "gateway-http.log", triton.http_url,
                              GATEWAY_TRITON_PROTOCOL="http", GATEWAY_TRITON_REPOSITORY_KEY=TRITON_KEY,
                              GATEWAY_API_KEYS=CLIENT_KEY)
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

