"""Input tensors through system shared memory: the answers of bytes, a registration Triton lost is
made again, and a Triton that refuses the region is sent bytes."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from client import classify
from server.settings import Settings
from server.shared_memory import SHM_DIRECTORY
from stack.launcher import free_port

from .conftest import MODEL, PIXEL_MODEL, QuickStopTriton, gateway_regions, metric, start_gateway
from .test_failures import wait_for

SHARED, BYTES = {"transport": "shared_memory"}, {"transport": "bytes"}


def inputs_sent(url: str, transport: dict) -> float:
    return metric(url, "gateway_triton_inputs_total", **transport) or 0.0


@pytest.fixture(scope="module")
def bytes_gateway(triton, tmp_path_factory):
    process = start_gateway(
        triton.grpc_url, tmp_path_factory.mktemp("bytes") / "gateway.log", GATEWAY_SHARED_MEMORY_SLOTS="0"
    )
    yield process
    process.stop()


def test_inputs_through_shared_memory_are_answered_exactly_as_bytes(gateway, bytes_gateway, triton, photos):
    assert gateway_regions(triton.grpc_url, gateway), "the gateway registered no region with Triton"
    before = inputs_sent(gateway.url, SHARED)
    # Six photos: the pixel model takes four a call, so its request is two calls at two offsets.
    for model in (MODEL, PIXEL_MODEL):
        through_memory = classify(photos, model=model, url=gateway.url, top_k=5)
        as_bytes = classify(photos, model=model, url=bytes_gateway.url, top_k=5)
        assert through_memory == as_bytes
    assert inputs_sent(gateway.url, SHARED) == before + 2
    assert inputs_sent(bytes_gateway.url, BYTES) >= 2 and inputs_sent(bytes_gateway.url, SHARED) == 0
    assert metric(bytes_gateway.url, "gateway_shared_memory_free_slots") == 0


def test_every_slot_is_free_again_after_good_and_bad_requests(gateway, photos):
    total = metric(gateway.url, "gateway_shared_memory_free_slots")
    assert total == Settings.model_fields["shared_memory_slots"].default
    classify(photos[:2], model=MODEL, url=gateway.url)
    broken = httpx.post(
        f"{gateway.url}/v1/models/{MODEL}/classify",
        content=photos[0].read_bytes()[:600],
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert broken.status_code == 400
    assert metric(gateway.url, "gateway_shared_memory_free_slots") == total


def test_a_region_triton_lost_is_registered_again_and_the_request_still_answered(gateway, triton, photos):
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        client.unregister_system_shared_memory()  # every region, as a restart between two probes would
    assert not gateway_regions(triton.grpc_url, gateway)
    as_bytes, through_memory = inputs_sent(gateway.url, BYTES), inputs_sent(gateway.url, SHARED)
    expected = classify(photos[:1], model=MODEL, url=gateway.url)  # sent as bytes, once Triton said no
    assert inputs_sent(gateway.url, BYTES) == as_bytes + 1
    assert gateway_regions(triton.grpc_url, gateway)
    assert classify(photos[:1], model=MODEL, url=gateway.url) == expected
    assert inputs_sent(gateway.url, SHARED) == through_memory + 1


def test_a_triton_that_cannot_open_the_region_is_sent_bytes(repository, photos, tmp_path):
    grpc_port = free_port()
    gateway = start_gateway(f"127.0.0.1:{grpc_port}", tmp_path / "gateway.log")
    try:
        # The gateway keeps its mapping, but the name is gone from /dev/shm, as for a Triton on another
        # host: Triton, started now, cannot open the key the gateway registers.
        (region,) = Path(SHM_DIRECTORY).glob(f"gateway-{gateway.pid}-*")
        region.unlink()
        with QuickStopTriton(
            model_repository=repository,
            http_port=free_port(),
            grpc_port=grpc_port,
            metrics_port=free_port(),
            cache_dir=tmp_path / "cache",
        ):
            # The next probe finds Triton back and offers the region, which Triton refuses.
            assert wait_for(lambda: "cannot use shared memory region" in gateway.log_path.read_text())
            answer = classify(photos[:2], model=MODEL, url=gateway.url)
            assert [len(r["predictions"]) for r in answer["results"]] == [5, 5]
            assert inputs_sent(gateway.url, BYTES) == 1 and inputs_sent(gateway.url, SHARED) == 0
    finally:
        gateway.stop()


def _v2_body(parameters: dict | None = None, where: str = "input") -> dict:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    body = {"inputs": [tensor], "outputs": [{"name": "logits"}]}
    if parameters:
        (tensor if where == "input" else body["outputs"][0] if where == "output" else body)["parameters"] = parameters
    return body


@pytest.mark.parametrize("where", ["input", "output", "request"])
def test_kserve_requests_cannot_name_a_shared_memory_region(gateway, triton, where):
    # The gateway's own region holds other requests' images: no client may read or write it by name.
    (region,) = gateway_regions(triton.grpc_url, gateway)
    parameters = {"shared_memory_region": region, "shared_memory_byte_size": 256}
    answer = httpx.post(f"{gateway.url}/v2/models/{MODEL}/infer", json=_v2_body(parameters, where), timeout=30)
    assert answer.status_code == 400 and "shared-memory" in answer.json()["error"]


def test_kserve_shared_memory_parameters_are_found_however_they_are_written(gateway):
    url = f"{gateway.url}/v2/models/{MODEL}/infer"
    escaped = json.dumps(_v2_body({"shared_memory_region": "x"})).replace("shared_memory", "shared\\u005fmemory")
    assert httpx.post(url, content=escaped, timeout=30).status_code == 400
    repeated = json.dumps(_v2_body({"shared_memory_region": "x"}))[:-1] + ', "inputs": []}'
    assert httpx.post(url, content=repeated, timeout=30).json()["error"].startswith("the inference header")
    packed = gzip.compress(json.dumps(_v2_body({"shared_memory_region": "x"})).encode())
    assert httpx.post(url, content=packed, headers={"Content-Encoding": "gzip"}, timeout=30).status_code == 400
    # The same bodies without the parameter pass, compressed or not.
    plain = json.dumps(_v2_body()).encode()
    assert httpx.post(url, content=plain, timeout=30).status_code == 200
    for encoding, packed in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))):
        assert httpx.post(url, content=packed, headers={"Content-Encoding": encoding}, timeout=30).status_code == 200
    # An encoding the gateway cannot read is not passed on unread.
    unread = httpx.post(url, content=plain, headers={"Content-Encoding": "br"}, timeout=30)
    assert unread.status_code == 415 and "gzip or deflate" in unread.json()["error"]
