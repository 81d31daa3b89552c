"""One trace across the gateway and the real Triton: both export OTLP/HTTP to a collector on loopback, and
Triton, which traces only requests that bring a trace context (rate=0), puts its spans under the
gateway's span of the call to it, in the trace of the client's traceparent; over gRPC and over HTTP."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from stack.launcher import free_port

from .conftest import MODEL, start_gateway, start_triton
from .test_failures import png, wait_for

# A client's trace per protocol, so that the two tests' spans cannot be taken for each other.
CLIENT_TRACE_IDS = {"grpc": "5e0ff0d5ba1e4d3c9a1b2c3d4e5f6a7b", "http": "6f1001e6cb2f5e4dab2c3d4e5f6a7b8c"}
CLIENT_SPAN_ID = "1122334455667788"


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
    trace_id = CLIENT_TRACE_IDS[protocol]
    try:
        answer = httpx.post(
            f"{gateway.url}/v1/models/{MODEL}/classify",
            content=png(),
            headers={"Content-Type": "image/png", "traceparent": f"00-{trace_id}-{CLIENT_SPAN_ID}-01"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert wait_for(lambda: collector.of_trace("triton", trace_id) and collector.of_trace("gateway", trace_id))
    finally:
        gateway.stop()  # flushes the gateway's last spans
    gateway_spans = {span.name: span for span in collector.of_trace("gateway", trace_id)}
    call = gateway_spans["triton.infer"]
    triton_spans = collector.of_trace("triton", trace_id)
    ids = {span.span_id for span in triton_spans}
    # Triton's top span (the one whose parent is none of its own) is a child of the gateway's call.
    (top,) = [span for span in triton_spans if span.parent_span_id not in ids]
    assert top.parent_span_id == call.span_id
    assert gateway_spans["POST /v1/models/{name}/classify"].parent_span_id.hex() == CLIENT_SPAN_ID
