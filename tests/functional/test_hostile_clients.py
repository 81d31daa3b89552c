"""Clients that send slowly, too much, or malformed framing: the gateway answers each with a 4xx and keeps
serving everyone else. Raw sockets where a well-behaved client library would refuse to send the request."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.utils import InferenceServerException

from ..conftest import transparent_png
from .conftest import MODEL, metric, start_gateway, start_triton
from .test_failures import wait_for

MAX_IN_FLIGHT = 2
BODY_TIMEOUT_S = 2
MAX_BODY_BYTES = 1_000_000
CLASSIFY = f"/v1/models/{MODEL}/classify"
V2_INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def stack(repository, tmp_path_factory):
    """Its own Triton (a request here must not take down the one other modules share) and a gateway with
    few slots, a short body deadline and a small body limit."""
    folder = tmp_path_factory.mktemp("hostile")
    triton = start_triton(repository, folder / "cache")
    try:
        gateway = start_gateway(
            triton.grpc_url,
            folder / "gateway.log",
            triton.http_url,
            GATEWAY_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
            GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
            GATEWAY_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        )
        try:
            yield triton, gateway
        finally:
            gateway.stop()
    finally:
        triton.stop()


@pytest.fixture
def gateway(stack):
    return stack[1]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buffer, "PNG")
    return buffer.getvalue()


V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()


def connect(url: str, timeout_s: float = 30) -> socket.socket:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def send_head(sock: socket.socket, path: str, headers: list[tuple[str, str | bytes]]) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: gateway\r\n".encode()
    for name, value in headers:
        head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    sock.sendall(head + b"\r\n")


def response_of(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def raw_request(url: str, path: str, headers: list[tuple[str, str | bytes]], body: bytes) -> tuple[int, bytes]:
    """One request written byte for byte, headers exactly as given (a Content-Length is added if none is)."""
    if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        headers = [*headers, ("Content-Length", str(len(body)))]
    with connect(url) as sock:
        send_head(sock, path, [*headers, ("Connection", "close")])
        sock.sendall(body)
        return response_of(sock)


def error_message(path: str, body: bytes) -> str:
    """The message of a JSON error body: KServe's {"error": "..."} on /v2, the gateway's own shape elsewhere."""
    error = json.loads(body)["error"]
    if path.startswith("/v2/"):
        assert isinstance(error, str) and error, body
        return error
    assert error["code"] and error["message"], body
    return error["message"]


def rejected(url: str, reason: str) -> float:
    return metric(url, "gateway_rejections_total", reason=reason) or 0.0


# Defect: the in-flight slot was taken before the body was read, and reading had no deadline.
def test_slow_bodies_neither_hold_the_inference_slots_nor_stay_past_the_deadline(gateway):
    before = rejected(gateway.url, "request_timeout")
    slow = []
    for path, content_type in [(CLASSIFY, "image/png")] * (2 * MAX_IN_FLIGHT) + [(V2_INFER, "application/json")]:
        sock = connect(gateway.url, timeout_s=4 * BODY_TIMEOUT_S)
        send_head(sock, path, [("Content-Type", content_type), ("Content-Length", "100000")])
        sock.sendall(b"0123456789")  # then nothing
        slow.append((path, sock))
    try:
        time.sleep(0.5)  # every slow request is in the gateway, waiting for the rest of its body
        started = time.monotonic()
        status, body = raw_request(gateway.url, CLASSIFY, [("Content-Type", "image/png")], png())
        assert status == 200, body
        answers = [(path, *response_of(sock)) for path, sock in slow]
        waited = time.monotonic() - started
    finally:
        for _, sock in slow:
            sock.close()
    assert [status for _, status, _ in answers] == [408] * len(slow)
    assert all("body" in error_message(path, body) for path, _, body in answers)
    assert waited < 3 * BODY_TIMEOUT_S
    assert rejected(gateway.url, "request_timeout") == before + len(slow)


# Defect: a chunked multipart body was read (and spooled to disk) in full before its size was checked.
def test_a_chunked_multipart_upload_is_cut_off_at_the_body_limit(gateway):
    total = 64 * MAX_BODY_BYTES
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    chunk = b"\0" * 256 * 1024
    answer: dict[str, object] = {}
    with connect(gateway.url) as sock:
        send_head(
            sock, CLASSIFY, [("Content-Type", "multipart/form-data; boundary=b"), ("Transfer-Encoding", "chunked")]
        )

        def read_answer() -> None:
            try:
                answer["status"], answer["body"] = response_of(sock)
            except OSError as e:
                answer["error"] = e

        reader = threading.Thread(target=read_answer, daemon=True)
        reader.start()
        sent = 0
        try:
            for piece in [part] + [chunk] * (total // len(chunk)):
                if not reader.is_alive():
                    break  # answered
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
            else:
                sock.sendall(b"9\r\n\r\n--b--\r\n\r\n0\r\n\r\n")
        except OSError:
            pass  # the gateway closed the connection: what it was meant to do
        reader.join(30)
    assert answer.get("status") == 413, answer
    assert json.loads(answer["body"])["error"]["code"] == "payload_too_large"
    # It stopped reading near the limit; what was sent beyond it sat in socket buffers at most.
    assert sent < total // 4, f"{sent} bytes were sent before the answer"


# Each was a 500, 502 or 503 before: a client's mistake, answered as one.
CLIENT_MISTAKES = {
    "a superscript digit as the inference header length": (
        V2_INFER,
        [("Content-Type", "application/json"), ("Inference-Header-Content-Length", b"\xb2")],
        V2_BODY,
    ),
    "a 5000-digit inference header length": (V2_INFER, [("Inference-Header-Content-Length", "9" * 5000)], V2_BODY),
    "an inference header length past the body": (V2_INFER, [("Inference-Header-Content-Length", "99999")], V2_BODY),
    "JSON nested 100,000 deep on classify": (
        CLASSIFY,
        [("Content-Type", "application/json")],
        b"[" * 100_000 + b"]" * 100_000,
    ),
    "JSON nested 100,000 deep on /v2": (
        V2_INFER,
        [("Content-Type", "application/json")],
        b"[" * 100_000 + b"]" * 100_000,
    ),
    "a non-ASCII byte in Content-Type on /v2": (V2_INFER, [("Content-Type", b"application/json\xe9")], V2_BODY),
    "a non-ASCII byte in a multipart boundary": (
        CLASSIFY,
        [("Content-Type", b"multipart/form-data; boundary=\xe9")],
        b"--\xe9\r\n",
    ),
    "tensor data that is not a list": (V2_INFER, [], V2_BODY.replace(b"[0.5", b'"x", "y": [0.5')),
    "fewer values than the shape holds": (V2_INFER, [], V2_BODY.replace(b"[0.5, 0.5, ", b"[", 1)),
    "a negative dimension": (V2_INFER, [], V2_BODY.replace(b"[1, 1, 8, 8]", b"[-1, 1, 8, 8]")),
    # Triton 2.51 allocates the tensor by its shape before reading the data: this one aborts it.
    "a shape of 10^12 images with the data of one": (
        V2_INFER,
        [],
        V2_BODY.replace(b"[1, 1, 8, 8]", b"[1000000000000, 1, 8, 8]"),
    ),
}


@pytest.mark.parametrize("path, headers, body", CLIENT_MISTAKES.values(), ids=CLIENT_MISTAKES.keys())
def test_client_mistakes_are_4xx_with_a_json_error_and_no_traceback(stack, gateway, path, headers, body):
    triton, _ = stack
    log_before = len(gateway.log_path.read_bytes())
    unavailable = metric(gateway.url, "gateway_triton_errors_total", code="triton_unavailable") or 0.0
    status, answer = raw_request(gateway.url, path, headers, body)
    assert 400 <= status < 500, (status, answer)
    error_message(path, answer)
    written = gateway.log_path.read_bytes()[log_before:]
    assert b"Traceback" not in written and b'"exception"' not in written, written[-2000:]
    assert (metric(gateway.url, "gateway_triton_errors_total", code="triton_unavailable") or 0.0) == unavailable
    assert httpx.get(f"http://{triton.http_url}/v2/health/ready", timeout=10).status_code == 200  # still up


ACCEPTED_AS_CHECKED = {
    # These were 502 and 503: the gateway checked one value and forwarded another that Triton (or httpx)
    # could not take. RFC 9110: whitespace around a field value is not part of it, content codings are
    # case-insensitive; Triton knows only the lower-case names.
    "a trailing space in Content-Type": [("Content-Type", "application/json ")],
    "a trailing space in Content-Encoding": [("Content-Encoding", "gzip ")],
    "an upper-case content coding": [("Content-Encoding", "GZIP")],
}


@pytest.mark.parametrize("headers", ACCEPTED_AS_CHECKED.values(), ids=ACCEPTED_AS_CHECKED.keys())
def test_framing_headers_are_forwarded_as_the_gateway_read_them(gateway, headers):
    body = gzip.compress(V2_BODY) if "Content-Encoding" in dict(headers) else V2_BODY
    status, answer = raw_request(gateway.url, V2_INFER, headers, body)
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["shape"] == [1, 10]


# Defect: the shared-memory check read the first of a repeated header, the forwarder sent the last.
REPEATED = {
    "Content-Type on classify": (CLASSIFY, [("Content-Type", "image/png")] * 2, png()),
    "Content-Type on /v2": (V2_INFER, [("Content-Type", "application/json")] * 2, V2_BODY),
    "Content-Encoding": (V2_INFER, [("Content-Encoding", "gzip")] * 2, gzip.compress(V2_BODY)),
    "Inference-Header-Content-Length": (
        V2_INFER,
        [("Inference-Header-Content-Length", str(len(V2_BODY)))] * 2,
        V2_BODY,
    ),
}


@pytest.mark.parametrize("path, headers, body", REPEATED.values(), ids=REPEATED.keys())
def test_repeated_framing_headers_are_refused(gateway, path, headers, body):
    single = raw_request(gateway.url, path, headers[:1], body)
    assert single[0] == 200, single
    status, answer = raw_request(gateway.url, path, headers, body)
    assert status == 400 and "more than once" in error_message(path, answer)


@pytest.mark.parametrize("name", ["Content-Length", "Transfer-Encoding"])
def test_repeated_length_headers_are_refused_by_the_http_server(gateway, name):
    value = str(len(V2_BODY)) if name == "Content-Length" else "chunked"
    body = V2_BODY if name == "Content-Length" else f"{len(V2_BODY):x}\r\n".encode() + V2_BODY + b"\r\n0\r\n\r\n"
    assert raw_request(gateway.url, V2_INFER, [(name, value)] * 2, body)[0] == 400


# Defect: /v2 errors came in the gateway's own shape, which tritonclient cannot read.
def test_tritonclient_reads_the_gateways_v2_errors(gateway):
    before = rejected(gateway.url, "payload_too_large")
    client = triton_http.InferenceServerClient(gateway.url.removeprefix("http://"))

    def failure(model: str, images: int, shape_of_one=(1, 8, 8)) -> InferenceServerException:
        tensor = triton_http.InferInput("input", [images, *shape_of_one], "FP32")
        tensor.set_data_from_numpy(np.zeros((images, *shape_of_one), np.float32), binary_data=True)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, [tensor])
        assert isinstance(caught.value.message(), str)
        return caught.value

    assert "unexpected shape" in str(failure(MODEL, 1, (3, 8, 8)))  # Triton's own 400
    assert failure("nope", 1).status() == "404"
    too_large = failure(MODEL, 4000)  # 1 MB of tensors: the gateway's own 413
    assert too_large.status() == "413" and "limit" in str(too_large)
    assert rejected(gateway.url, "payload_too_large") == before + 1
    status, answer = raw_request(gateway.url, "/v2/repository/index", [], b"{}")
    assert status == 404 and error_message("/v2/", answer)


def requests_by_status(url: str) -> dict[str, float]:
    """gateway_requests_total per HTTP status, all models together."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("gateway_requests_total{"):
            sample, _, value = line.rpartition(" ")
            status = sample.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0.0) + float(value)
    return counts


# Defect: a client that sent its whole request and hung up at once was still decoded, sent to Triton and
# counted as served (200).
def test_an_abandoned_request_is_dropped_and_counted_as_499(gateway):
    part = (
        b'--XXB\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + transparent_png(1000) + b"\r\n"
    )
    body = part * 3 + b"--XXB--\r\n"
    assert len(body) < MAX_BODY_BYTES
    before, disconnected = requests_by_status(gateway.url), rejected(gateway.url, "client_disconnected")
    free_slots = metric(gateway.url, "gateway_shared_memory_free_slots")
    for abandoned in range(1, 4):
        sock = connect(gateway.url)
        send_head(
            sock, CLASSIFY, [("Content-Type", "multipart/form-data; boundary=XXB"), ("Content-Length", str(len(body)))]
        )
        sock.sendall(body)
        sock.close()
        # One at a time, each finished before the next: none is refused for want of a slot.
        assert wait_for(
            lambda abandoned=abandoned: (
                sum(requests_by_status(gateway.url).values()) - sum(before.values()) == abandoned
            )
        )
    after = requests_by_status(gateway.url)
    assert after.get("499", 0) - before.get("499", 0) == 3, after
    assert after.get("200", 0) == before.get("200", 0), after
    assert rejected(gateway.url, "client_disconnected") == disconnected + 3
    # The shared-memory slots came back, and everyone else is still served.
    assert wait_for(lambda: metric(gateway.url, "gateway_shared_memory_free_slots") == free_slots)
    assert (
        httpx.post(
            f"{gateway.url}{CLASSIFY}", content=png(), headers={"Content-Type": "image/png"}, timeout=30
        ).status_code
        == 200
    )
