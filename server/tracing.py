"""OpenTelemetry tracing for the gateway, off unless GATEWAY_TRACING=true.

On, each request is one trace: FastAPI's own telemetry opens the server span (continuing the W3C
`traceparent` a request comes with), the classify route adds spans for reading the body, decoding and
preprocessing, and every inference call to Triton gets a client span whose context goes to Triton in the
call's `traceparent` header, so that a Triton with OpenTelemetry tracing on puts its spans in the same
trace. Spans leave through a batching processor and the OTLP/HTTP exporter, which read the SDK's standard
variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_BSP_*, ...).

Off, no provider, processor or exporter thread is made, FastAPI's telemetry is told to stay out of every
request, and the code on a request's path checks one `tracer is None` before doing anything here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

log = logging.getLogger("server.tracing")

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from .settings import Settings

# service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service.
SERVICE_NAME = "image-gateway"
# What the SDK calls a service that names none (opentelemetry.sdk.resources.Resource.create).
UNNAMED_SERVICE = "unknown_service"
NO_SPAN: AbstractContextManager[None] = nullcontext()
# Probes and scrapes, every few seconds from each prober, would drown the requests' traces.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# FastAPI's own HTTP metrics and logs stay off either way: the gateway has its Prometheus metrics and
# JSON log lines. FastAPI's spans for dependencies, endpoint and serialization too: the stage spans
# below say where a request's time goes. Never FastAPI's own exporter setup from the environment, which
# would add a second exporter to the provider.
FASTAPI_OFF: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


def span_exporter() -> SpanExporter:
    """OTLP over HTTP (protobuf), to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_EXPORTER_OTLP_ENDPOINT
    followed by /v1/traces; http://localhost:4318/v1/traces when neither is set."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def tracer_provider(settings: Settings) -> TracerProvider | None:
    """The gateway's own tracer provider, or None with tracing off. Not made the global one: each app
    has its own, shut down (its last spans flushed) with the app."""
    if not settings.tracing:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith(UNNAMED_SERVICE):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER, parent-based by default
    provider.add_span_processor(BatchSpanProcessor(span_exporter()))
    return provider


# At shutdown the last spans get this long to go out: a collector that hangs or is gone must not hold the
# gateway past its stop deadline (the SDK's exporter retries for up to its own 10 s timeout, several times).
SHUTDOWN_FLUSH_S = 2.0


def shut_down(provider: TracerProvider, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
    """Flush and stop `provider`, waiting at most `timeout_s`; spans not out by then are dropped."""
    stopping = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    stopping.start()
    stopping.join(timeout_s)
    if stopping.is_alive():
        log.warning("tracing: spans not exported within %.0f s of shutdown were dropped", timeout_s)


def fastapi_telemetry(provider: TracerProvider | None) -> TelemetryConfig:
    """FastAPI(telemetry=...): server spans from this provider, or none at all."""
    if provider is None:
        return FASTAPI_OFF
    return {**FASTAPI_OFF, "tracing": True, "tracer_provider": provider, "exclude": untraced}


def untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("server") if provider is not None else None


def span(tracer: Tracer | None, name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one, current while the block runs; an exception leaving the block is
    recorded on it with status ERROR. With tracing off, a shared no-op context."""
    if tracer is None:
        return NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


def client_span(tracer: Tracer, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Span]:
    """The span of a call to another service (Triton), which continues it from the headers it is sent."""
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def with_trace_context(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` and the current span's context (`traceparent`, and `tracestate` or `baggage` when there
    is some), in the propagators' format (OTEL_PROPAGATORS; W3C trace context and baggage by default)."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


class StageSpans:
    """Spans for the decode and preprocess stages, around the one call that runs both (on the event loop
    or in a preprocessing thread) and reports each stage's seconds in all; this base makes none."""

    def __enter__(self) -> StageSpans:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        return None

    def record(self, decode_s: float, preprocess_s: float) -> None:
        pass


NO_STAGE_SPANS = StageSpans()


class TracedStageSpans(StageSpans):
    """The stages run image by image, interleaved: each span lasts its stage's total and they end where
    the call returned, decode first (exact for one image; for several, the stages' sums). A call that
    fails leaves one decode span, from the start of the wait for it to the failure, with the error: the
    failures there are the images' own and the decoding limits'."""

    def __init__(self, tracer: Tracer, images: int) -> None:
        self.tracer, self.attributes = tracer, {"gateway.images": images}
        self.started = 0
        self.decode_s = self.preprocess_s = 0.0

    def __enter__(self) -> StageSpans:
        self.started = time.time_ns()
        return self

    def record(self, decode_s: float, preprocess_s: float) -> None:
        self.decode_s, self.preprocess_s = decode_s, preprocess_s

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        ended = time.time_ns()
        if error is not None:
            failed = self.tracer.start_span("decode", start_time=self.started, attributes=self.attributes)
            failed.record_exception(error)
            failed.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            failed.end(end_time=ended)
            return None
        preprocess_start = max(self.started, ended - round(self.preprocess_s * 1e9))
        decode_start = max(self.started, preprocess_start - round(self.decode_s * 1e9))
        for name, start, end in (("decode", decode_start, preprocess_start), ("preprocess", preprocess_start, ended)):
            self.tracer.start_span(name, start_time=start, attributes=self.attributes).end(end_time=end)
        return None


def stage_spans(tracer: Tracer | None, images: int) -> StageSpans:
    return NO_STAGE_SPANS if tracer is None else TracedStageSpans(tracer, images)
