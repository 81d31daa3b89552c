"""Tracing in process: the spans of a classify request, the trace context it continues and the one it hands
to Triton, and no span at all unless tracing is on. Spans go to the SDK's in-memory exporter in place of
OTLP; the gateway's own replica pool and TritonClient run, with tritonclient's asyncio gRPC client replaced
by a double that serves the model and records the headers of each inference call."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tritonclient.utils import InferenceServerException

from server import tracing
from server.app import create_app
from server.deps import get_triton_proxy

from .conftest import CLASSES, INFO, MODEL, gateway_settings, png

CLASSIFY = f"/v1/models/{MODEL}/classify"
REQUEST_SPAN = "POST /v1/models/{name}/classify"  # FastAPI names its server span by the route
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
PARAMETERS = {**INFO.spec.to_parameters(), "labels": json.dumps(list(INFO.labels))}
CONFIG = {
    "max_batch_size": INFO.max_batch_size,
    "parameters": {key: {"string_value": value} for key, value in PARAMETERS.items()},
    "input": [{"name": INFO.input_name, "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}],
    "output": [{"name": INFO.output_name, "dims": [str(CLASSES)]}],
}


class Answer:
    def __init__(self, rows: int) -> None:
        self.logits = np.tile(np.arange(CLASSES, dtype=np.float32), (rows, 1))

    def get_response(self):
        return type("Response", (), {"model_version": "1"})()

    def as_numpy(self, name: str) -> np.ndarray:
        return self.logits


class Tritonclient:
    """tritonclient.grpc.aio.InferenceServerClient's part that the routes here use; every instance records the
    headers of its inference calls in `sent`, and raises `failure` there when one is set."""

    sent: list[dict[str, str] | None] = []
    failure: Exception | None = None

    def __init__(self, url: str, *args, **kwargs) -> None:
        pass

    async def is_server_ready(self, **kwargs) -> bool:
        return True

    async def get_model_repository_index(self, headers=None, as_json: bool = False, **kwargs) -> dict:
        return {"models": [{"name": MODEL, "version": "1", "state": "READY"}]}

    async def get_model_config(self, name: str, as_json: bool = False, **kwargs) -> dict:
        return {"config": CONFIG}

    async def infer(self, model_name, inputs, model_version="", outputs=None, headers=None, **kwargs):
        type(self).sent.append(headers)
        if type(self).failure is not None:
            raise type(self).failure
        (tensor,) = inputs
        return Answer(tensor._get_tensor().shape[0])

    async def close(self) -> None:
        pass


@pytest.fixture
def triton(monkeypatch) -> type[Tritonclient]:
    monkeypatch.setattr(tritonclient.grpc.aio, "InferenceServerClient", Tritonclient)
    monkeypatch.setattr(Tritonclient, "sent", [])
    monkeypatch.setattr(Tritonclient, "failure", None)
    return Tritonclient


@pytest.fixture
def exported(monkeypatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "span_exporter", lambda: exporter)
    return exporter


def classify(exported: InMemorySpanExporter, headers: dict[str, str] | None = None, **settings):
    """One classify request to a gateway of these settings; its answer, and the spans it exported once
    the gateway has stopped (which flushes them)."""
    with TestClient(create_app(gateway_settings(**settings))) as client:
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png", **(headers or {})})
    return answer, {span.name: span for span in exported.get_finished_spans()}


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def test_a_classify_request_is_one_trace_of_the_request_and_its_stages(triton, exported):
    answer, spans = classify(exported, tracing=True)
    assert answer.status_code == 200
    request = spans.pop(REQUEST_SPAN)
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert sorted(spans) == ["decode", "preprocess", "read", "triton.infer"]
    assert {span.context.trace_id for span in spans.values()} == {request.context.trace_id}
    assert {name: parent_of(span) for name, span in spans.items()} == dict.fromkeys(spans, request.context.span_id)
    # In the order they ran, none before its predecessor ended.
    stages = [spans[name] for name in ("read", "decode", "preprocess", "triton.infer")]
    assert all(a.end_time <= b.start_time for a, b in zip(stages, stages[1:]))
    call = spans["triton.infer"]
    assert call.kind == SpanKind.CLIENT
    assert {
        key: call.attributes[key] for key in ("triton.model.name", "triton.model.version", "triton.batch_size")
    } == {
        "triton.model.name": MODEL,
        "triton.model.version": "1",
        "triton.batch_size": 1,
    }
    assert spans["decode"].attributes["gateway.images"] == 1


def test_an_incoming_traceparent_is_continued_and_triton_is_sent_the_same_trace(triton, exported):
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    answer, spans = classify(exported, {"traceparent": traceparent}, tracing=True)
    assert answer.status_code == 200
    request, call = spans[REQUEST_SPAN], spans["triton.infer"]
    assert format(request.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert format(parent_of(request) or 0, "016x") == CLIENT_SPAN_ID
    # What tritonclient was handed: the Triton call's own span as the parent of whatever Triton makes.
    ((sent),) = triton.sent
    assert sent == {"traceparent": f"00-{CLIENT_TRACE_ID}-{call.context.span_id:016x}-01"}


def test_a_failed_triton_call_is_recorded_on_its_span_with_error_status(triton, exported):
    triton.failure = InferenceServerException("failed to run the model", status="StatusCode.INTERNAL")
    answer, spans = classify(exported, tracing=True)
    assert answer.status_code == 502
    call = spans["triton.infer"]
    assert call.status.status_code == StatusCode.ERROR and "failed to run the model" in call.status.description
    assert [event.name for event in call.events] == ["exception"]


def test_an_image_that_does_not_decode_is_recorded_on_the_decode_span(triton, exported):
    with TestClient(create_app(gateway_settings(tracing=True))) as client:
        answer = client.post(CLASSIFY, content=b"junk", headers={"Content-Type": "image/png"})
    assert answer.status_code == 400
    spans = {span.name: span for span in exported.get_finished_spans()}
    assert "preprocess" not in spans and "triton.infer" not in spans
    assert spans["decode"].status.status_code == StatusCode.ERROR
    assert "InvalidImage" in spans["decode"].status.description


def exporter_threads() -> list[str]:
    return sorted(thread.name for thread in threading.enumerate() if "otel" in thread.name.lower())


def test_tracing_is_off_unless_asked_for_no_spans_no_exporter_thread_nothing_sent_on(triton, exported):
    traceparent = {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    for tracing_on in (False, True):
        before = exporter_threads()
        with TestClient(create_app(gateway_settings(**({"tracing": True} if tracing_on else {})))) as client:
            answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png", **traceparent})
            assert answer.status_code == 200
            threads = exporter_threads()
        spans = exported.get_finished_spans()
        if tracing_on:  # the same request: the setting is what stood between the two
            assert spans and len(threads) == len(before) + 1 and "traceparent" in (triton.sent[-1] or {})
        else:
            assert not spans and threads == before and triton.sent == [None]


def test_a_v2_inference_passed_through_to_triton_carries_the_trace_on(exported):
    sent: list[str | None] = []

    def triton_http(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("traceparent"))
        return httpx.Response(200, json={"model_name": MODEL, "outputs": []})

    app = create_app(gateway_settings(tracing=True))
    app.dependency_overrides[get_triton_proxy] = lambda: httpx.AsyncClient(
        transport=httpx.MockTransport(triton_http), base_url="http://triton"
    )
    with TestClient(app) as client:
        answer = client.post(
            f"/v2/models/{MODEL}/infer",
            json={"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]},
            headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"},
        )
    assert answer.status_code == 200
    call = {span.name: span for span in exported.get_finished_spans()}["triton.infer"]
    assert call.kind == SpanKind.CLIENT and format(call.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert sent == [f"00-{CLIENT_TRACE_ID}-{call.context.span_id:016x}-01"]


def test_probes_and_scrapes_are_not_traced(triton, exported):
    with TestClient(create_app(gateway_settings(tracing=True))) as client:
        assert [client.get(path).status_code for path in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
        assert client.get("/v1/models").status_code == 200
    assert [span.name for span in exported.get_finished_spans()] == ["GET /v1/models"]
