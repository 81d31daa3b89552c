"""Tracing against the real Triton, every span exported with OTLP/HTTP to a collector on loopback: the
gateway's spans of a classify request, one trace continuing the client's traceparent, and Triton's spans
under the gateway's span of the call to it (Triton traces only requests that bring a trace context,
rate=0), over gRPC and over HTTP; a failed call, an image that does not decode, the /v2 pass-through, the
paths left untraced, and nothing at all, Triton's side included, with tracing off. The gateway runs as a
process for the end-to-end trace and in process (TestClient over create_app, pointed at the same Triton)
for the rest."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from server.app import create_app
from server.settings import Settings
from stack.launcher import free_port

from .conftest import MODEL, start_gateway, start_triton
from .test_failures import png, wait_for
from .test_kserve import tensor_request

# A client's trace per protocol, so that the two tests' spans cannot be taken for each other.
# (the last two digits are the attempt's: see traced_by_triton)
CLIENT_TRACE_IDS = {"grpc": "5e0ff0d5ba1e4d3c9a1b2c3d4e5f6a00", "http": "6f1001e6cb2f5e4dab2c3d4e5f6a7b00"}
CLIENT_SPAN_ID = "1122334455667788"
CLASSIFY = f"/v1/models/{MODEL}/classify"
REQUEST_SPAN = "POST /v1/models/{name}/classify"  # FastAPI names its server span by the route
STAGES = ("read", "decode", "preprocess", "triton.infer")  # in the order they run


def ids_as_base64(export: dict) -> dict:
    """OTLP/JSON writes trace and span ids in hex, where protobuf's JSON mapping of bytes is base64
    (opentelemetry-proto's docs/specification.md, "JSON Protobuf Encoding")."""
    for resource_spans in export.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return export


class Collector:
    """An OTLP/HTTP trace receiver on loopback: every span it is sent, as (service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                if "json" in self.headers.get("Content-Type", ""):  # Triton's exporter sends OTLP/JSON
                    json_format.ParseDict(ids_as_base64(json.loads(body)), request)
                else:
                    request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans += [(attributes.get("service.name", ""), s) for s in scope_spans.spans]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, service: str, trace_id: str) -> list:
        return [span for name, span in self.spans if name == service and span.trace_id.hex() == trace_id]

    def of_service(self, service: str) -> list:
        return [span for name, span in self.spans if name == service]

    def of_trace_anywhere(self, trace_id: str) -> list:
        return [span for _, span in self.spans if span.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def traced_triton(repository, tmp_path_factory):
    collector = Collector()
    # Triton's OpenTelemetry mode (docs/user_guide/trace.md in triton-inference-server/server): with rate=0
    # it traces exactly the requests that carry a trace context, and exports every 100 ms.
    trace_config = [
        "mode=opentelemetry",
        "rate=0",
        "count=-1",
        "level=TIMESTAMPS",
        f"opentelemetry,url={collector.url}/v1/traces",
        "opentelemetry,resource=service.name=triton",
        "opentelemetry,bsp_schedule_delay=100",
    ]
    triton = start_triton(
        repository,
        tmp_path_factory.mktemp("traced-triton"),
        extra_args=[arg for setting in trace_config for arg in ("--trace-config", setting)],
    )
    yield triton, collector
    triton.stop()
    collector.close()


def traceparent(trace_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{CLIENT_SPAN_ID}-01"}


def attributes_of(span: Span) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def by_name(spans: list) -> dict[str, Span]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def classify_trace(spans: list, protocol: str) -> dict[str, Span]:
    """The gateway's spans of one classify request of one image, checked to be one trace: the request's
    server span, and under it a span for each stage, in the order they ran, with their attributes."""
    named = by_name(spans)
    assert sorted(named) == sorted([REQUEST_SPAN, *STAGES])
    request = named[REQUEST_SPAN]
    assert request.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert {span.trace_id for span in spans} == {request.trace_id}
    assert {name: named[name].parent_span_id for name in STAGES} == dict.fromkeys(STAGES, request.span_id)
    # None before its predecessor ended.
    stages = [named[name] for name in STAGES]
    assert all(a.end_time_unix_nano <= b.start_time_unix_nano for a, b in zip(stages, stages[1:]))
    call = named["triton.infer"]
    assert call.kind == Span.SpanKind.SPAN_KIND_CLIENT
    attributes = attributes_of(call)
    assert {key: attributes[key] for key in ("triton.model.name", "triton.model.version", "triton.batch_size")} == {
        "triton.model.name": MODEL,
        "triton.model.version": "1",  # the version Triton answered with: none was asked for
        "triton.batch_size": 1,
    }
    assert attributes["triton.protocol"] == protocol
    assert attributes_of(named["decode"])["gateway.images"] == 1
    assert all(span.status.code != Status.StatusCode.STATUS_CODE_ERROR for span in spans)
    return named


def traced_by_triton(collector: Collector, send: Callable[[int], str], attempts: int = 4) -> str:
    """The trace id of the first of `send`'s requests (each in a new trace; it returns the trace's id) whose
    spans Triton exported. Triton now and then exports nothing at all for a request it was sent a trace
    context with, and logs nothing about it either (about one request in fifteen in these tests, with
    Triton's exporter and this collector idle otherwise), so a request is sent again in a new trace; a
    gateway that sends Triton no trace context fails every attempt."""
    for attempt in range(attempts):
        trace_id = send(attempt)
        if wait_for(lambda trace_id=trace_id: collector.of_trace("triton", trace_id), timeout_s=10):
            return trace_id
    raise AssertionError(f"Triton exported spans for none of {attempts} traced requests")


def assert_triton_continues(collector: Collector, call: Span) -> None:
    """Triton's spans are in the trace of the gateway's call to it, its top span (the one whose parent is
    none of its own) a child of that call: Triton was sent the call's traceparent."""
    triton_spans = collector.of_trace("triton", call.trace_id.hex())
    ids = {span.span_id for span in triton_spans}
    (top,) = [span for span in triton_spans if span.parent_span_id not in ids]
    assert top.parent_span_id == call.span_id


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_gateway_and_triton_spans_of_a_request_are_one_trace(traced_triton, protocol, tmp_path):
    triton, collector = traced_triton
    gateway = start_gateway(
        triton.grpc_url,
        tmp_path / "gateway.log",
        triton.http_url,
        GATEWAY_TRITON_PROTOCOL=protocol,
        GATEWAY_TRACING="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_SERVICE_NAME="gateway",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )

    def send(attempt: int) -> str:
        trace_id = f"{CLIENT_TRACE_IDS[protocol][:-2]}{attempt:02x}"
        answer = httpx.post(
            f"{gateway.url}{CLASSIFY}",
            content=png(),
            headers={"Content-Type": "image/png", **traceparent(trace_id)},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return trace_id

    try:
        trace_id = traced_by_triton(collector, send)
    finally:
        gateway.stop()  # flushes the gateway's last spans
    spans = classify_trace(collector.of_trace("gateway", trace_id), protocol)
    assert spans[REQUEST_SPAN].parent_span_id.hex() == CLIENT_SPAN_ID
    assert_triton_continues(collector, spans["triton.infer"])


@contextmanager
def gateway_in_process(traced_triton, monkeypatch, service: str, **settings) -> Iterator[TestClient]:
    """The gateway in process against the traced Triton, its spans sent as `service` to the collector; they
    are all there once the block has ended (the gateway's shutdown flushes them)."""
    triton, collector = traced_triton
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    app = create_app(
        Settings(
            triton_grpc_url=triton.grpc_url,
            triton_http_url=triton.http_url,
            shared_memory_slots=0,
            log_json=False,
            **settings,
        )
    )
    with TestClient(app) as client:
        yield client


def test_a_request_without_a_trace_context_starts_a_trace_that_triton_joins(traced_triton, monkeypatch):
    _, collector = traced_triton

    def send(attempt: int) -> str:
        with gateway_in_process(traced_triton, monkeypatch, f"gateway-root-{attempt}", tracing=True) as client:
            answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        spans = classify_trace(collector.of_service(f"gateway-root-{attempt}"), "grpc")
        assert not spans[REQUEST_SPAN].parent_span_id
        return spans[REQUEST_SPAN].trace_id.hex()

    trace_id = traced_by_triton(collector, send)
    call = next(span for span in collector.of_trace_anywhere(trace_id) if span.name == "triton.infer")
    assert_triton_continues(collector, call)


def test_a_failed_triton_call_is_recorded_on_its_span_with_error_status(traced_triton, monkeypatch):
    _, collector = traced_triton
    with gateway_in_process(traced_triton, monkeypatch, "gateway-failure", tracing=True) as client:
        # A version Triton does not serve: the model is known, so the call itself is what fails.
        answer = client.post(f"{CLASSIFY}?version=99", content=png(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 404, answer.text
    spans = by_name(collector.of_service("gateway-failure"))
    call = spans["triton.infer"]
    assert attributes_of(call)["triton.model.version"] == "99"
    assert call.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert "version 99" in call.status.message
    assert [event.name for event in call.events] == ["exception"]
    assert call.parent_span_id == spans[REQUEST_SPAN].span_id and call.trace_id == spans[REQUEST_SPAN].trace_id


def test_an_image_that_does_not_decode_is_recorded_on_the_decode_span(traced_triton, monkeypatch):
    _, collector = traced_triton
    with gateway_in_process(traced_triton, monkeypatch, "gateway-junk", tracing=True) as client:
        answer = client.post(CLASSIFY, content=b"junk", headers={"Content-Type": "image/png"})
    assert answer.status_code == 400, answer.text
    spans = by_name(collector.of_service("gateway-junk"))
    assert sorted(spans) == sorted([REQUEST_SPAN, "read", "decode"])
    decode = spans["decode"]
    assert decode.status.code == Status.StatusCode.STATUS_CODE_ERROR and "InvalidImage" in decode.status.message
    assert [event.name for event in decode.events] == ["exception"]
    assert decode.parent_span_id == spans[REQUEST_SPAN].span_id


def test_a_v2_inference_passed_through_to_triton_carries_the_trace_on(traced_triton, monkeypatch):
    _, collector = traced_triton

    def send(attempt: int) -> str:
        trace_id = f"7a2112f7dc306f5ebc3d4e5f6a7b8c{attempt:02x}"
        answer = client.post(f"/v2/models/{MODEL}/infer", json=tensor_request(), headers=traceparent(trace_id))
        assert answer.status_code == 200, answer.text
        return trace_id

    with gateway_in_process(traced_triton, monkeypatch, "gateway-v2", tracing=True) as client:
        trace_id = traced_by_triton(collector, send)
    spans = by_name(collector.of_trace("gateway-v2", trace_id))
    assert sorted(spans) == ["POST /v2/models/{name}/infer", "triton.infer"]
    request, call = spans["POST /v2/models/{name}/infer"], spans["triton.infer"]
    assert call.kind == Span.SpanKind.SPAN_KIND_CLIENT and call.trace_id.hex() == trace_id
    assert call.parent_span_id == request.span_id and request.parent_span_id.hex() == CLIENT_SPAN_ID
    assert attributes_of(call) == {"triton.model.name": MODEL, "triton.protocol": "http"}
    assert_triton_continues(collector, call)


def test_probes_and_scrapes_are_not_traced(traced_triton, monkeypatch):
    _, collector = traced_triton
    with gateway_in_process(traced_triton, monkeypatch, "gateway-probed", tracing=True) as client:
        assert [client.get(path).status_code for path in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
        assert client.get("/v1/models").status_code == 200
    assert [span.name for span in collector.of_service("gateway-probed")] == ["GET /v1/models"]


def exporter_threads() -> list[str]:
    return sorted(thread.name for thread in threading.enumerate() if "otel" in thread.name.lower())


def test_tracing_is_off_unless_asked_for_no_spans_no_exporter_thread_no_trace_to_triton(traced_triton, monkeypatch):
    """A request with a client's trace context to a gateway with tracing off, then the same to one with it on:
    the setting is what stands between the two. Triton traces any request that brings a context, so none
    reached it from the first once the spans of one after it have arrived."""
    _, collector = traced_triton
    untraced_id = "8b3223081e417a6fcd4e5f6a7b8c9d0e"
    before = exporter_threads()
    with gateway_in_process(traced_triton, monkeypatch, "gateway-tracing-off") as client:
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png", **traceparent(untraced_id)})
        assert answer.status_code == 200, answer.text
        assert exporter_threads() == before

    def send(attempt: int) -> str:
        trace_id = f"9c4334192f528b70de5f6a7b8c9d0e{attempt:02x}"
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png", **traceparent(trace_id)})
        assert answer.status_code == 200, answer.text
        return trace_id

    with gateway_in_process(traced_triton, monkeypatch, "gateway-tracing-on", tracing=True) as client:
        assert len(exporter_threads()) == len(before) + 1
        traced_by_triton(collector, send)
    assert not collector.of_service("gateway-tracing-off") and collector.of_service("gateway-tracing-on")
    assert not collector.of_trace_anywhere(untraced_id)
