"""Large JSON bodies are parsed off the event loop, small ones on it: in-process, no Triton needed."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

LARGE = 2_000_000  # bytes of JSON


@pytest.fixture
def parsed_on_loop(monkeypatch) -> list[tuple[int, bool]]:
    """(size, whether it ran in a thread with a running event loop) for each JSON document parsed."""
    calls: list[tuple[int, bool]] = []
    loads = json.loads

    def recording_loads(text, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(text), on_loop))
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", recording_loads)
    return calls


@pytest.fixture
def client(unused_ports):
    grpc, http = unused_ports
    settings = Settings(
        triton_grpc_url=f"127.0.0.1:{grpc}",
        triton_http_url=f"127.0.0.1:{http}",
        log_json=False,
        shared_memory_slots=0,
        triton_timeout_s=1,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def unused_ports() -> tuple[int, int]:
    from stack.launcher import free_port

    return free_port(), free_port()


def v2_body(values: int) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input", "shape": [values], "datatype": "FP32", "data": [0] * values}]}
    ).encode()


def test_a_large_v2_body_is_parsed_and_counted_off_the_event_loop(client, parsed_on_loop):
    body = v2_body(LARGE // 2)
    response = client.post("/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 503, response.text  # checked, then Triton (absent) is unreachable
    assert [on_loop for size, on_loop in parsed_on_loop if size == len(body)] == [False]


def test_a_large_classify_json_body_is_parsed_off_the_event_loop(client, parsed_on_loop):
    body = json.dumps({"images": [""] * (LARGE // 4)}).encode()
    response = client.post("/v1/models/digits/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text  # too many images, told once it is parsed
    assert [on_loop for size, on_loop in parsed_on_loop if size == len(body)] == [False]


def test_a_small_json_body_is_parsed_on_the_event_loop(client, parsed_on_loop):
    body = v2_body(64)
    response = client.post("/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 503, response.text
    assert [on_loop for size, on_loop in parsed_on_loop if size == len(body)] == [True]
