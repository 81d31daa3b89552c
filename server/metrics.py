"""Prometheus metrics of the gateway. Label values are bounded: model names Triton serves, or "unknown"."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "preprocess", "inference", "total")
# Milliseconds to seconds: preprocessing of a small image takes ~1 ms, a CPU batch can take a second.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Classification requests by model and HTTP status",
            ["model", "status"], registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "gateway_stage_seconds", "Time spent per request in each stage", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.images = Counter("gateway_images", "Images classified", ["model"], registry=self.registry)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests being served", registry=self.registry)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)
