"""SIGTERM to the gateway under uvicorn: it drains, then exits 0, and no accepted request is lost.

A request is held in flight by the slow model's batcher (20 s in its queue), not by sleeping.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest

from builder.publish import PublishSettings, publish
from server.drain import longest_request_s
from server.settings import Settings

from .conftest import metric, start_gateway, start_triton
from .test_failures import wait_for
from .test_gateway import encoded, held_by_triton, post

# The model holds a request 20 s in its batcher's queue; the drain lasts 12 s, long enough for the checks
# below on two loaded cores and shorter than the hold: the held request is still in flight when the drain
# ends, and the gateway waits for it before it exits.
HOLD_S = 20
DRAIN_S = 12
TRITON_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def slow_stack(tiny_run, tmp_path_factory):
    """Triton with a model named `slow` (as `held_by_triton` expects) whose queue of one holds 20 s."""
    folder = tmp_path_factory.mktemp("drain")
    publish(
        tiny_run / "model.onnx",
        folder / "repo",
        "slow",
        settings=PublishSettings(
            max_batch_size=32, preferred_batch_sizes=(32,), max_queue_delay_us=HOLD_S * 1_000_000, max_queue_size=1
        ),
    )
    server = start_triton(folder / "repo", folder / "cache")
    yield server, folder
    server.stop()


def status_of(url: str) -> int | None:
    """The status of a GET, or None when nothing answers (the gateway has stopped listening)."""
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.TransportError:
        return None


def exit_code(gateway, timeout_s: float) -> int | None:
    """The gateway's exit status once it has exited on its own within `timeout_s`, else None."""
    process = gateway._process
    return process.returncode if wait_for(lambda: process.poll() is not None, timeout_s) else None


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(slow_stack):
    server, folder = slow_stack
    gateway = start_gateway(
        server.grpc_url,
        folder / "gateway-drain.log",
        server.http_url,
        GATEWAY_DRAIN_S=str(DRAIN_S),
        GATEWAY_TRITON_TIMEOUT_S=str(TRITON_TIMEOUT_S),
    )
    try:
        assert status_of(f"{gateway.url}/readyz") == 200
        with held_by_triton(gateway.url, server) as held:
            os.kill(gateway.pid, signal.SIGTERM)
            assert wait_for(lambda: status_of(f"{gateway.url}/readyz") == 503, DRAIN_S), gateway.log_tail()
            refused = post(
                gateway.url,
                "/v1/models/slow/classify",
                content=encoded("L", "PNG"),
                headers={"Content-Type": "image/png"},
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "draining" and refused.headers["Retry-After"]
            assert refused.headers["Connection"] == "close"
            tensor = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
            refused_v2 = post(gateway.url, "/v2/models/slow/infer", json=tensor)
            assert refused_v2.status_code == 503 and refused_v2.headers["Retry-After"], refused_v2.text
            assert isinstance(refused_v2.json()["error"], str)  # KServe's shape on /v2
            assert status_of(f"{gateway.url}/healthz") == 200  # alive: no liveness restart mid-drain
            assert metric(gateway.url, "gateway_rejections_total", reason="draining") == 2
            assert metric(gateway.url, "gateway_in_flight_requests") == 1  # the held one, still going
        assert held and held[0].status_code == 200, held[0].text if held else "no answer"
        bound = DRAIN_S + longest_request_s(Settings(triton_timeout_s=TRITON_TIMEOUT_S))
        assert exit_code(gateway, bound) == 0, gateway.log_tail()
    finally:
        gateway.stop()


def test_an_idle_gateway_exits_0_after_its_drain_and_a_second_sigterm_changes_nothing(slow_stack):
    server, folder = slow_stack
    gateway = start_gateway(server.grpc_url, folder / "gateway-idle-drain.log", GATEWAY_DRAIN_S="1")
    try:
        os.kill(gateway.pid, signal.SIGTERM)
        assert wait_for(lambda: status_of(f"{gateway.url}/readyz") == 503, 10), gateway.log_tail()
        os.kill(gateway.pid, signal.SIGTERM)
        assert exit_code(gateway, 30) == 0, gateway.log_tail()
    finally:
        gateway.stop()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return True
    return False


def test_a_connection_opened_before_the_listeners_close_is_still_answered(slow_stack):
    """uvicorn's shutdown closes the listeners and every connection between two requests at once, so a
    request sent on such a connection then would get no answer. The gateway closes its listeners first
    and answers what comes on the open connections (closing each) before uvicorn's shutdown."""
    server, folder = slow_stack
    gateway = start_gateway(server.grpc_url, folder / "gateway-listeners.log", GATEWAY_DRAIN_S="1")
    try:
        idle = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        os.kill(gateway.pid, signal.SIGTERM)
        # The drain period is over once a new connection is refused; the one opened before is still open.
        deadline = time.monotonic() + 30
        while not refused("127.0.0.1", gateway.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert refused("127.0.0.1", gateway.port), gateway.log_tail()
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        answer = idle.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" in answer.lower()
        idle.close()
        assert exit_code(gateway, 30) == 0, gateway.log_tail()
    finally:
        gateway.stop()
