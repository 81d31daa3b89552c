"""Bounds on what many clients at once can make the gateway hold: bodies buffered in memory, connections,
and the gateway's refusal of /v2 JSON that Triton cannot read. Raw sockets, as in test_hostile_clients."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from stack.launcher import GatewayProcess, LaunchError, free_port

from .conftest import MODEL, metric, start_gateway
from .test_hostile_clients import V2_INFER, connect, raw_request, response_of, send_head

CLASSIFY = f"/v1/models/{MODEL}/classify"
MIB = 1024 * 1024
BODY_LIMIT = 8 * MIB
BUFFER_LIMIT = 4 * BODY_LIMIT
BODY_TIMEOUT_S = 3


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def buffering_gateway(triton, tmp_path_factory):
    gateway = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("buffers") / "gateway.log",
        triton.http_url,
        GATEWAY_MAX_BODY_BYTES=str(BODY_LIMIT),
        GATEWAY_MAX_BUFFERED_BODY_BYTES=str(BUFFER_LIMIT),
        GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    )
    yield gateway
    gateway.stop()


def hold_full_budget(gateway: GatewayProcess) -> list:
    """Connections that have each sent all but one byte of a body of the limit: the budget is full."""
    body = b"\xff\xd8" + b"\0" * (BODY_LIMIT - 3)
    held = []
    for _ in range(BUFFER_LIMIT // BODY_LIMIT):
        sock = connect(gateway.url, timeout_s=4 * BODY_TIMEOUT_S)
        send_head(sock, CLASSIFY, [("Content-Type", "image/jpeg"), ("Content-Length", str(BODY_LIMIT))])
        sock.sendall(body)
        held.append(sock)
        time.sleep(0.3)  # read by the gateway before the next one starts
    return held


# Defect: nothing capped the bodies being read at once; 60 slow 19 MiB bodies took the gateway from 241 MB
# to 1.40 GB, which it kept after they had all been answered 408.
def test_slow_large_bodies_cannot_buffer_past_the_cap_and_their_memory_goes_back(buffering_gateway):
    gateway = buffering_gateway
    baseline = rss_bytes(gateway.pid)
    held, refused = [], []
    try:
        held = hold_full_budget(gateway)
        for _ in range(12):  # more bodies of the limit: each refused once its bytes pass the budget
            sock = connect(gateway.url, timeout_s=4 * BODY_TIMEOUT_S)
            refused.append(sock)
            send_head(sock, CLASSIFY, [("Content-Type", "image/jpeg"), ("Content-Length", str(BODY_LIMIT))])
            sock.sendall(b"\0" * 65536)
        answers = [response_of(sock) for sock in refused]
        time.sleep(0.5)
        peak = rss_bytes(gateway.pid) - baseline
        late = [response_of(sock) for sock in held]
    finally:
        for sock in held + refused:
            sock.close()
    assert {status for status, _ in answers} == {429}, answers
    assert all(json.loads(answer)["error"]["code"] == "too_many_requests" for _, answer in answers)
    assert [status for status, _ in late] == [408] * len(held)
    assert peak < BUFFER_LIMIT + 24 * MIB, f"RSS grew by {peak / MIB:.0f} MiB"
    time.sleep(0.5)
    after = rss_bytes(gateway.pid) - baseline
    assert after < 12 * MIB, f"RSS still {after / MIB:.0f} MiB above where it started (peak +{peak / MIB:.0f})"
    # Every reservation was given back: a body of the limit is read again.
    body = b"\xff\xd8" + b"\0" * (BODY_LIMIT - 2)
    status, answer = raw_request(gateway.url, CLASSIFY, [("Content-Type", "image/jpeg")], body)
    assert status == 400, answer  # read in full, then refused as not an image


# Defect: a body's whole Content-Length was reserved before any of it came: four clients that declared
# bodies of the limit and sent a byte every few seconds had every request with a body answered 429.
def test_slow_clients_that_declared_large_bodies_do_not_lock_out_others(buffering_gateway):
    gateway = buffering_gateway
    slow = []
    try:
        for _ in range(BUFFER_LIMIT // BODY_LIMIT):
            sock = connect(gateway.url, timeout_s=4 * BODY_TIMEOUT_S)
            send_head(sock, CLASSIFY, [("Content-Type", "image/jpeg"), ("Content-Length", str(BODY_LIMIT))])
            sock.sendall(b"\xff")
            slow.append(sock)
        time.sleep(0.3)
        status, answer = raw_request(gateway.url, CLASSIFY, [("Content-Type", "image/jpeg")], b"\xff\xd8 not a jpeg")
    finally:
        for sock in slow:
            sock.close()
    assert status == 400, answer  # read and decoded, not refused for the bytes others only announced


def test_a_refused_body_says_when_to_retry(buffering_gateway):
    gateway = buffering_gateway
    socks = []
    try:
        socks = hold_full_budget(gateway)
        with connect(gateway.url) as sock:
            send_head(sock, V2_INFER, [("Content-Type", "application/json"), ("Content-Length", str(BODY_LIMIT))])
            sock.sendall(b"{" * 65536)
            response = http.client.HTTPResponse(sock)
            response.begin()
            status, retry_after, answer = response.status, response.getheader("Retry-After"), response.read()
    finally:
        for sock in socks:
            sock.close()
    assert status == 429 and retry_after, (status, answer)
    assert isinstance(json.loads(answer)["error"], str)  # KServe's shape on /v2


# Defect: uvicorn ran with no connection limit.
def test_connections_past_the_limit_are_answered_503(triton, tmp_path):
    limit = 4
    gateway = start_gateway(
        triton.grpc_url, tmp_path / "gateway.log", triton.http_url, GATEWAY_MAX_CONNECTIONS=str(limit)
    )
    try:
        idle = [connect(gateway.url) for _ in range(limit)]
        try:
            time.sleep(0.3)
            with connect(gateway.url) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                status, _ = response_of(sock)
        finally:
            for sock in idle:
                sock.close()
        assert status == 503
        time.sleep(0.3)
        with connect(gateway.url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            assert response_of(sock)[0] == 200
    finally:
        gateway.stop()


V2_GOOD = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
# Python's JSON parser reads each of these; Triton's refuses them, and was answered 502 "triton_error".
TRITON_UNREADABLE_JSON = {
    "a number past the float range": json.dumps(V2_GOOD).replace("0.5", "1e400", 1).encode(),
    "NaN": json.dumps(V2_GOOD).replace("0.5", "NaN", 1).encode(),
    "a UTF-16 body": json.dumps(V2_GOOD).encode("utf-16"),
    "a lone surrogate in the id": json.dumps({**V2_GOOD, "id": "\ud800"}).encode(),
    "a lone surrogate in a key": json.dumps({**V2_GOOD, "parameters": {"\udc00": 1}}).encode(),
}


@pytest.mark.parametrize("body", TRITON_UNREADABLE_JSON.values(), ids=TRITON_UNREADABLE_JSON.keys())
def test_json_that_triton_cannot_read_is_a_400(gateway, body):
    failed = metric(gateway.url, "gateway_triton_errors_total", code="triton_error") or 0.0
    status, answer = raw_request(gateway.url, V2_INFER, [("Content-Type", "application/json")], body)
    assert status == 400, answer
    assert isinstance(json.loads(answer)["error"], str), answer
    assert (metric(gateway.url, "gateway_triton_errors_total", code="triton_error") or 0.0) == failed


def test_json_with_a_paired_surrogate_is_forwarded(gateway):
    body = json.dumps({**V2_GOOD, "id": "\U0001f600"}).encode()  # ASCII escapes of a surrogate pair
    status, answer = raw_request(gateway.url, V2_INFER, [("Content-Type", "application/json")], body)
    assert status == 200, answer
    assert json.loads(answer)["id"] == "\U0001f600"


# Defect: a key source that held no key left the gateway open to all.
@pytest.mark.parametrize(
    "env",
    [{"GATEWAY_API_KEYS": " , "}, {"GATEWAY_API_KEYS_FILE": "EMPTY"}],
    ids=["keys of blanks", "an empty keys file"],
)
def test_the_gateway_refuses_to_start_on_a_key_source_without_keys(tmp_path, env):
    empty = tmp_path / "keys"
    empty.write_text("\n  \n")
    env = {name: str(empty) if value == "EMPTY" else value for name, value in env.items()}
    gateway = GatewayProcess(port=free_port(), log_path=tmp_path / "gateway.log", env=env, startup_timeout_s=30)
    with pytest.raises(LaunchError, match="exited"):
        gateway.start()
    gateway.stop()
    log = gateway.log_path.read_text()
    assert "holds no API key" in log, log
    assert "Traceback" not in log, log
