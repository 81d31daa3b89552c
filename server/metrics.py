"""Prometheus metrics of the gateway.

Label values are bounded: model names Triton serves (or "unknown"), versions Triton answered with or a
model's config names, HTTP statuses, stage names and the gateway's own error codes; never raw user strings.

With several worker processes (server/serve.py), prometheus-client's multiprocess mode is on
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before any worker starts): each worker writes its values
to files of its own there and /metrics, whichever worker answers it, sums them all. Gauges say how:
"livesum" adds the values of the workers alive (a dead one's are dropped, see server/serve.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

STAGES = ("decode", "preprocess", "inference", "total")
# Milliseconds to seconds: preprocessing of a small image takes ~1 ms, a CPU batch can take a second.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = (1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 5e6, 2e7)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Softmax scores lie in [0, 1]: their differences too.
SCORE_DIFFERENCE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What /metrics serves: this process's own metrics, or every worker's, summed, in multiprocess mode.
        self.exposed = r
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
        self.requests = Counter(
            "gateway_requests", "Inference requests by model and HTTP status", ["model", "status"], registry=r
        )
        # Per served version (a canary rollout compares them): the version that answered, else the one the
        # model's rollout chose, else "none"; only versions named by Triton or the model's config.
        self.version_requests = Counter(
            "gateway_version_requests",
            "Classifications by model, version and HTTP status",
            ["model", "version", "status"],
            registry=r,
        )
        self.version_seconds = Histogram(
            "gateway_version_request_seconds",
            "Classification time in the gateway, by model and version",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "gateway_stage_seconds",
            "Time spent per request in each stage",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.images = Counter("gateway_images", "Images classified", ["model"], registry=r)
        self.images_per_request = Histogram(
            "gateway_images_per_request", "Images in one request", buckets=IMAGES_BUCKETS, registry=r
        )
        self.request_bytes = Histogram("gateway_request_bytes", "Request body size", buckets=BYTES_BUCKETS, registry=r)
        self.response_bytes = Histogram(
            "gateway_response_bytes", "Response body size", buckets=BYTES_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Inference requests in the gateway, from the start of their body to the answer",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Per model asked for and the faster model that answered instead (server/degrade.py).
        self.degraded_requests = Counter(
            "gateway_degraded_requests",
            "Classifications answered by a faster model because the model asked for was past its threshold",
            ["model", "to"],
            registry=r,
        )
        self.model_in_flight = Gauge(
            "gateway_model_in_flight_requests",
            "Classifications in flight, by the model that answers them (what degradation thresholds compare)",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter(
            "gateway_rejections", "Requests refused, by reason (the error code)", ["reason"], registry=r
        )
        self.triton_inputs = Counter(
            "gateway_triton_inputs",
            "Classifications Triton answered, by how their input tensors travelled: shared_memory or bytes",
            ["transport"],
            registry=r,
        )
        self.preprocessing = Counter(
            "gateway_preprocessing",
            "Requests preprocessed, by where: event_loop (small JPEGs alone in the gateway) or thread_pool",
            ["where"],
            registry=r,
        )
        self.shared_memory_free_slots = Gauge(
            "gateway_shared_memory_free_slots",
            "Free slots of the shared-memory regions for input tensors (0 also when there is no region)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.triton_errors = Counter(
            "gateway_triton_errors", "Failed Triton calls, by the gateway's error code", ["code"], registry=r
        )
        # Canary rollouts watched by server/shadow.py. `against`: "stable" (the rollout's other version,
        # counted under the canary) or "reference" (the model's reference model, under the version served).
        self.shadow_comparisons = Counter(
            "gateway_shadow_comparisons",
            "Images whose answer was compared with another model's or version's (shadow requests)",
            ["model", "version", "against"],
            registry=r,
        )
        self.shadow_agreements = Counter(
            "gateway_shadow_agreements",
            "Compared images whose top-1 class was the same in both answers",
            ["model", "version", "against"],
            registry=r,
        )
        self.shadow_score_difference = Histogram(
            "gateway_shadow_score_difference",
            "|difference| of the two answers' scores for the compared version's top-1 class",
            ["model", "version", "against"],
            buckets=SCORE_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.shadow_skipped = Counter(
            "gateway_shadow_skipped",
            "Shadow requests not compared, by reason: busy (dropped), error, reference_mismatch",
            ["model", "reason"],
            registry=r,
        )
        self.canary_halted = Gauge(
            "gateway_rollout_canary_halted",
            "1: this gateway stopped routing to the canary of this rollout (rollout.id), by the guard rail it broke",
            ["model", "version", "rollout", "reason"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.canary_requests = Counter(
            "gateway_rollout_canary_requests",
            "Requests routed to the canary of this rollout (rollout.id): what its guard rails judge",
            ["model", "version", "rollout"],
            registry=r,
        )
        self.canary_retries = Counter(
            "gateway_rollout_canary_retries",
            "Requests the canary failed (Triton errors) and the stable version answered",
            ["model", "version"],
            registry=r,
        )

        self.model_versions_unavailable = Gauge(
            "gateway_model_versions_unavailable",
            "Versions of a model that Triton tried to load and could not, as of the gateway's last read of "
            "Triton's model index (every /readyz and /v1/models); their reasons are on /v1/models",
            ["model"],
            registry=r,
            # Every worker reads the same index: the latest read is the answer, never a sum over workers.
            multiprocess_mode="livemostrecent",
        )
        self._indexed_models: set[str] = set()

    def observe_failed_versions(self, failed: Mapping[str, Iterable[object]]) -> None:
        """Set the unavailable-version gauge from one read of the index: model name -> versions that failed
        to load; a model gone from the index is dropped from the gauge."""
        for name in self._indexed_models - failed.keys():
            self.model_versions_unavailable.remove(name)
        for name, versions in failed.items():
            self.model_versions_unavailable.labels(name).set(len(list(versions)))
        self._indexed_models = set(failed)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def latest(self) -> bytes:
        """The text exposition format of every metric, summed over the workers in multiprocess mode."""
        return generate_latest(self.exposed)
