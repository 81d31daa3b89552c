"""What a load test found: locust's CSVs and the Prometheus metrics scraped before and after, summarized.

`build_summary()` turns the raw files into a `Summary`; `render_markdown()` writes it for people and
`check_thresholds()` says whether the run passed. Counters are compared after minus before, so a
server that has been up for hours reports only what this run did.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
GATEWAY_STAGES = ("decode", "preprocess", "inference", "total")


@dataclass(frozen=True)
class RequestStats:
    """One row of locust's `_stats.csv`: a request name, or `Aggregated` for all of them."""

    name: str
    requests: int
    failures: int
    rps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class HistoryPoint:
    """One second of the run (locust's `_stats_history.csv`, all requests together)."""

    elapsed_s: float
    users: int
    rps: float
    failures_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class StageLatency:
    """The gateway's time in one stage during the run, from its histogram (quantiles interpolated in buckets)."""

    stage: str
    count: int
    mean_ms: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class TritonLoad:
    """What Triton did for one model during the run: requests, the batches it formed, queue and compute time."""

    model: str
    requests: int
    inferences: int
    executions: int
    queue_ms: float  # per request, mean
    compute_ms: float  # per request, mean: input + infer + output
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> executions

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0


@dataclass(frozen=True)
class Thresholds:
    max_fail_ratio: float = 0.01
    max_p99_ms: float | None = None


@dataclass
class Summary:
    target: str
    settings: dict[str, str]
    total: RequestStats
    requests: list[RequestStats]
    history: list[HistoryPoint]
    stages: list[StageLatency]
    gateway_statuses: dict[str, int]
    triton: list[TritonLoad]
    ramp: dict | None = None

    @property
    def duration_s(self) -> float:
        return self.history[-1].elapsed_s if self.history else 0.0


# --- Prometheus text ---------------------------------------------------------------------------------


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels.

    Counters are keyed without the `_total` suffix: the parser adds it to Triton's counters, which are
    exposed without it, and the gateway's carry it; one spelling for both.
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total") if family.type == "counter" else sample.name
            samples[(name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def counter_delta(before: Samples, after: Samples) -> Samples:
    """after - before for every sample present after (a sample new in this run counts from zero)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def histogram_quantile(buckets: Iterable[tuple[float, float]], quantile: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the quantile."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper_bound, count in ordered:
        if count >= rank:
            if math.isinf(upper_bound):
                return lower_bound  # past the last finite bucket all we know is "at least this"
            width = count - lower_count
            return lower_bound + (upper_bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = upper_bound, count
    return lower_bound


def gateway_stages(delta: Samples) -> list[StageLatency]:
    stages = []
    for stage in GATEWAY_STAGES:
        count = total(delta, "gateway_stage_seconds_count", stage=stage)
        if count <= 0:
            continue
        buckets = [
            (float(dict(labels)["le"]), value)
            for (name, labels), value in delta.items()
            if name == "gateway_stage_seconds_bucket" and dict(labels).get("stage") == stage
        ]
        stages.append(
            StageLatency(
                stage=stage,
                count=int(count),
                mean_ms=1000 * total(delta, "gateway_stage_seconds_sum", stage=stage) / count,
                p50_ms=1000 * histogram_quantile(buckets, 0.50),
                p99_ms=1000 * histogram_quantile(buckets, 0.99),
            )
        )
    return stages


def gateway_statuses(delta: Samples) -> dict[str, int]:
    statuses: dict[str, int] = {}
    for (name, labels), value in delta.items():
        if name == "gateway_requests" and value > 0:
            status = dict(labels).get("status", "?")
            statuses[status] = statuses.get(status, 0) + int(value)
    return dict(sorted(statuses.items()))


def _batch_sizes(stats_before: Mapping, stats_after: Mapping, model: str) -> dict[int, int]:
    """Executions per batch size during the run, from Triton's statistics extension (batch_stats)."""

    def executions(stats: Mapping) -> dict[int, int]:
        found: dict[int, int] = {}
        for entry in stats.get("model_stats", []):
            if entry.get("name") != model:
                continue
            for batch in entry.get("batch_stats", []):
                size = int(batch["batch_size"])
                found[size] = found.get(size, 0) + int(batch.get("compute_infer", {}).get("count", 0))
        return found

    before, after = executions(stats_before), executions(stats_after)
    sizes = {size: count - before.get(size, 0) for size, count in after.items()}
    return {size: count for size, count in sorted(sizes.items()) if count > 0}


def triton_loads(
    delta: Samples, stats_before: Mapping | None = None, stats_after: Mapping | None = None
) -> list[TritonLoad]:
    """Per model with traffic in this run: Triton's counters turned into batch sizes and time per request."""
    models = sorted(
        {
            dict(labels).get("model", "")
            for (name, labels), value in delta.items()
            if name == "nv_inference_request_success" and value > 0
        }
    )
    loads = []
    for model in models:
        requests = total(delta, "nv_inference_request_success", model=model)
        compute_us = sum(
            total(delta, f"nv_inference_compute_{part}_duration_us", model=model)
            for part in ("input", "infer", "output")
        )
        loads.append(
            TritonLoad(
                model=model,
                requests=int(requests),
                inferences=int(total(delta, "nv_inference_count", model=model)),
                executions=int(total(delta, "nv_inference_exec_count", model=model)),
                queue_ms=total(delta, "nv_inference_queue_duration_us", model=model) / requests / 1000,
                compute_ms=compute_us / requests / 1000,
                batch_sizes=_batch_sizes(stats_before or {}, stats_after or {}, model),
            )
        )
    return loads


# --- locust CSV -------------------------------------------------------------------------------------


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # locust writes N/A before the first response


def read_request_stats(path: Path) -> list[RequestStats]:
    """locust's `<prefix>_stats.csv`, one entry per request name plus `Aggregated` (last)."""
    with open(path, newline="") as f:
        return [
            RequestStats(
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=_number(row["Requests/s"]),
                mean_ms=_number(row["Average Response Time"]),
                p50_ms=_number(row["50%"]),
                p95_ms=_number(row["95%"]),
                p99_ms=_number(row["99%"]),
            )
            for row in csv.DictReader(f)
        ]


def read_history(path: Path) -> list[HistoryPoint]:
    """The `Aggregated` rows of locust's `<prefix>_stats_history.csv`, time counted from the first row.

    Throughput and failures per second come from the differences of the running totals between rows,
    not from locust's own Requests/s column, which is smoothed over several seconds and lags a ramp.
    """
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Name"] == "Aggregated"]
    points = []
    for previous, row in zip([None, *rows], rows):
        seconds = int(row["Timestamp"]) - int(previous["Timestamp"]) if previous else 0
        requests = int(row["Total Request Count"]) - (int(previous["Total Request Count"]) if previous else 0)
        failures = int(row["Total Failure Count"]) - (int(previous["Total Failure Count"]) if previous else 0)
        # Before the first response locust writes 0 or N/A as percentiles: no data, not 0 ms.
        quantiles = [_number(row[q]) if int(row["Total Request Count"]) else math.nan for q in ("50%", "95%", "99%")]
        points.append(
            HistoryPoint(
                elapsed_s=float(int(row["Timestamp"]) - int(rows[0]["Timestamp"])),
                users=int(row["User Count"]),
                rps=requests / seconds if seconds > 0 else 0.0,
                failures_per_s=failures / seconds if seconds > 0 else 0.0,
                p50_ms=quantiles[0],
                p95_ms=quantiles[1],
                p99_ms=quantiles[2],
            )
        )
    return points


# --- the summary ------------------------------------------------------------------------------------


def _read_optional(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def build_summary(report_dir: Path, *, target: str, settings: Mapping[str, str]) -> Summary:
    """Read a report folder (locust CSVs, metrics-before/ and metrics-after/, ramp.json) into a Summary."""
    requests = read_request_stats(report_dir / "locust_stats.csv")
    aggregated = next((r for r in requests if r.name == "Aggregated"), None)
    if aggregated is None:
        raise ValueError(f"{report_dir / 'locust_stats.csv'} has no Aggregated row")
    before, after = report_dir / "metrics-before", report_dir / "metrics-after"
    gateway = counter_delta(
        parse_samples(_read_optional(before / "gateway.prom")), parse_samples(_read_optional(after / "gateway.prom"))
    )
    triton = counter_delta(
        parse_samples(_read_optional(before / "triton.prom")), parse_samples(_read_optional(after / "triton.prom"))
    )
    ramp_path = report_dir / "ramp.json"
    return Summary(
        target=target,
        settings=dict(settings),
        total=aggregated,
        requests=[r for r in requests if r.name != "Aggregated"],
        history=read_history(report_dir / "locust_stats_history.csv"),
        stages=gateway_stages(gateway),
        gateway_statuses=gateway_statuses(gateway),
        triton=triton_loads(triton, _read_json(before / "triton-stats.json"), _read_json(after / "triton-stats.json")),
        ramp=_read_json(ramp_path) if ramp_path.exists() else None,
    )


def check_thresholds(summary: Summary, thresholds: Thresholds) -> list[str]:
    """What went over the limits, one sentence each; empty when the run passed."""
    problems = []
    if summary.total.requests == 0:
        problems.append("no request completed")
    if summary.total.failure_ratio > thresholds.max_fail_ratio:
        problems.append(f"failure ratio {summary.total.failure_ratio:.2%} is over {thresholds.max_fail_ratio:.2%}")
    if thresholds.max_p99_ms is not None and summary.total.p99_ms > thresholds.max_p99_ms:
        problems.append(f"p99 {summary.total.p99_ms:.0f} ms is over {thresholds.max_p99_ms:.0f} ms")
    return problems


def saturation_step(ramp: Mapping) -> dict | None:
    """The ramp step with the highest throughput among those within the p99 budget."""
    within = [s for s in ramp.get("steps", []) if s.get("within_budget")]
    return max(within, key=lambda s: s["rps"]) if within else None
