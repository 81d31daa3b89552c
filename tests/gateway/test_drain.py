"""A draining gateway, in process: not ready, new inference refused with 503, everything else answered.
(SIGTERM under uvicorn, the drain's start and the exit: tests/functional/test_drain.py.)"""

from __future__ import annotations

import signal
import socket
import sys
import time

import pytest

from server.drain import drain_on_sigterm, refuse_new_connections

from .conftest import MODEL, client_of, gateway_settings, png, rejections


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}/classify", f"/v2/models/{MODEL}/infer"])
def test_a_draining_gateway_refuses_new_inference_with_503_and_is_not_ready(replicas, path):
    with client_of(gateway_settings(), replicas) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.drain.since = time.monotonic()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "the gateway is shutting down"
        refused = client.post(path, content=png(), headers={"Content-Type": "image/png"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.headers["Connection"] == "close"
        error = refused.json()["error"]
        # KServe's {"error": "<message>"} on /v2, the gateway's own shape elsewhere.
        assert "shutting down" in (error if path.startswith("/v2/") else error["message"])
        assert path.startswith("/v2/") or error["code"] == "draining"
        assert rejections(client, "draining") == 1
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/models").status_code == 200
    assert not replicas.batches  # nothing reached Triton


def test_outside_uvicorn_the_gateway_leaves_sigterm_alone(replicas):
    before = signal.getsignal(signal.SIGTERM)
    with client_of(gateway_settings(), replicas) as client:
        assert client.get("/healthz").status_code == 200
        assert signal.getsignal(signal.SIGTERM) is before
    assert drain_on_sigterm(client.app.state.drain, gateway_settings()) is None


@pytest.mark.skipif(sys.platform != "linux", reason="socket filters are Linux's")
def test_a_listener_told_to_refuse_keeps_what_the_kernel_completed_and_completes_no_more():
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    address = listener.getsockname()
    early, late = socket.socket(), socket.socket()
    try:
        early.connect(address)  # completed by the kernel, not yet accepted
        early.sendall(b"a request")
        assert refuse_new_connections(listener)
        late.settimeout(0.5)
        with pytest.raises(TimeoutError):
            late.connect(address)  # its SYN is ignored: no connection to reset at the close
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.recv(64) == b"a request"
            accepted.sendall(b"an answer")
            assert early.recv(64) == b"an answer"
        listener.close()
        fresh = socket.socket()
        with fresh, pytest.raises(ConnectionRefusedError):
            fresh.connect(address)
    finally:
        for sock in (early, late, listener):
            sock.close()
