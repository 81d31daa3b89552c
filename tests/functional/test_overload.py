"""A body trickled a byte at a time, never idle for long, is still cut off at the body deadline, and holds
no inference slot meanwhile: a gateway with one slot answers other clients while it trickles."""

from __future__ import annotations

import json
import threading

import pytest

from .conftest import start_gateway
from .test_hostile_clients import CLASSIFY, connect, png, raw_request, response_of, send_head

BODY_TIMEOUT_S = 2
TRICKLE_EVERY_S = 0.2
# Twenty seconds of trickle, ten times the deadline; the declared body is longer still.
TRICKLE_BYTES = 100


@pytest.fixture(scope="module")
def one_slot_gateway(triton, tmp_path_factory):
    gateway = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("overload") / "gateway.log",
        triton.http_url,
        GATEWAY_MAX_IN_FLIGHT="1",
        GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    )
    yield gateway
    gateway.stop()


def test_a_trickled_body_is_cut_off_at_the_deadline_without_holding_a_slot(one_slot_gateway):
    gateway = one_slot_gateway
    answered = threading.Event()
    sent: list[int] = []

    def trickle(sock) -> None:
        try:
            for _ in range(TRICKLE_BYTES):
                if answered.wait(TRICKLE_EVERY_S):
                    return
                sock.sendall(b"\x89")
                sent.append(1)
        except OSError:
            pass  # the gateway closed the connection with its answer

    with connect(gateway.url, timeout_s=10 * BODY_TIMEOUT_S) as sock:
        send_head(sock, CLASSIFY, [("Content-Type", "image/png"), ("Content-Length", str(10 * TRICKLE_BYTES))])
        sender = threading.Thread(target=trickle, args=(sock,))
        sender.start()
        try:
            # The one slot is free: the trickling request has not got its body in.
            status, body = raw_request(gateway.url, CLASSIFY, [("Content-Type", "image/png")], png())
            assert status == 200, body
            status, body = response_of(sock)
        finally:
            answered.set()
            sender.join(10)
    # Refused while the client was still sending, not once it stopped (an idle timeout would wait for that).
    assert 0 < len(sent) < TRICKLE_BYTES
    assert status == 408, body
    assert json.loads(body)["error"]["code"] == "request_timeout"
