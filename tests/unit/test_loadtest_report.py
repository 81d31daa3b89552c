"""The load-test report: locust's CSVs and scraped Prometheus text -> Summary -> summary.md, latency.png, verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtests.ramp import step_percentile
from loadtests.render import batch_size_ranges, plot_latency, render_markdown
from loadtests.report import (
    Thresholds,
    build_summary,
    check_thresholds,
    counter_delta,
    histogram_quantile,
    parse_samples,
    read_history,
    saturation_step,
    triton_loads,
)
from loadtests.run import main as run_main
from loadtests.run import parser as run_parser
from loadtests.targets import TargetRefused, require_loopback

# Triton exposes its counters without the _total suffix; the text is as its /metrics answers.
TRITON_BEFORE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="digits",version="1"} 100
# TYPE nv_inference_count counter
nv_inference_count{model="digits",version="1"} 150
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="digits",version="1"} 100
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="digits",version="1"} 100000
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="digits",version="1"} 1000
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="digits",version="1"} 500000
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="digits",version="1"} 9000
"""
# 400 more requests carrying 1200 images in 300 executions; 2 s more queueing, 4 s more compute.
TRITON_AFTER = (
    TRITON_BEFORE.replace("} 100\n# TYPE nv_inference_count", "} 500\n# TYPE nv_inference_count")
    .replace("} 150\n", "} 1350\n")
    .replace('exec_count{model="digits",version="1"} 100', 'exec_count{model="digits",version="1"} 400')
    .replace("} 100000\n", "} 2100000\n")
    .replace("} 500000\n", "} 4490000\n")
)

GATEWAY_TEXT = """\
# TYPE gateway_requests_total counter
gateway_requests_total{{model="digits",status="200"}} {ok}
gateway_requests_total{{model="digits",status="429"}} {busy}
# TYPE gateway_stage_seconds histogram
gateway_stage_seconds_bucket{{le="0.01",stage="total"}} {fast}
gateway_stage_seconds_bucket{{le="0.1",stage="total"}} {all}
gateway_stage_seconds_bucket{{le="+Inf",stage="total"}} {all}
gateway_stage_seconds_count{{stage="total"}} {all}
gateway_stage_seconds_sum{{stage="total"}} {seconds}
"""


def triton_stats(executions_by_size: dict[int, int]) -> dict:
    """Triton's statistics-extension answer for one model, reduced to what the report reads."""
    return {
        "model_stats": [
            {
                "name": "digits",
                "version": "1",
                "batch_stats": [
                    {"batch_size": size, "compute_infer": {"count": count, "ns": 1000 * count}}
                    for size, count in executions_by_size.items()
                ],
            }
        ]
    }


HISTORY_HEADER = (
    "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
    "99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
    "Total Average Response Time,Total Min Response Time,Total Max Response Time,"
    "Total Average Content Size\n"
)
STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,"
    "90%,95%,98%,99%,99.9%,99.99%,100%\n"
)


def history_row(timestamp: int, users: int, p50: str, p99: str, total: int, failed: int) -> str:
    return (
        f"{timestamp},{users},,Aggregated,0.0,0.0,{p50},{p50},{p50},{p50},{p99},{p99},{p99},{p99},{p99},{p99},"
        f"{p99},{total},{failed},0,0.0,0,0,0\n"
    )


# The columns between the failure count and p99: median, mean, min, max, size, rps, fails/s, p50 ... p98.
STATS_MIDDLE = "20,25.0,5,300,120,40.0,0.2,20,22,24,25,30,60,90"


def write_report_dir(folder: Path, *, requests: int = 400, failures: int = 2, p99_ms: int = 120) -> Path:
    """A report folder as a run leaves it: locust's CSVs and the metrics before and after."""
    (folder / "locust_stats.csv").write_text(
        STATS_HEADER
        + f"POST,classify raw,{requests},{failures},{STATS_MIDDLE},{p99_ms},300,300,300\n"
        + f",Aggregated,{requests},{failures},{STATS_MIDDLE},{p99_ms},300,300,300\n"
    )
    (folder / "locust_stats_history.csv").write_text(
        HISTORY_HEADER
        + history_row(1000, 0, "N/A", "N/A", 0, 0)
        + history_row(1001, 4, "20", "100", 30, 0)
        + history_row(1003, 4, "21", "110", 110, 2)
        + history_row(1010, 4, "20", "120", requests, failures)
    )
    for name, gateway, triton, stats in (
        ("metrics-before", dict(ok=10, busy=0, fast=5, all=10, seconds=0.5), TRITON_BEFORE, {1: 100}),
        ("metrics-after", dict(ok=408, busy=2, fast=205, all=410, seconds=12.5), TRITON_AFTER, {1: 150, 4: 250}),
    ):
        (folder / name).mkdir()
        (folder / name / "gateway.prom").write_text(GATEWAY_TEXT.format(**gateway))
        (folder / name / "triton.prom").write_text(triton)
        (folder / name / "triton-stats.json").write_text(json.dumps(triton_stats(stats)))
    return folder


def test_counters_are_keyed_without_the_total_suffix_whether_or_not_the_server_wrote_it():
    triton = parse_samples(TRITON_BEFORE)
    gateway = parse_samples(GATEWAY_TEXT.format(ok=3, busy=1, fast=1, all=4, seconds=0.1))
    assert triton[("nv_inference_request_success", (("model", "digits"), ("version", "1")))] == 100
    assert gateway[("gateway_requests", (("model", "digits"), ("status", "200")))] == 3


def test_histogram_quantile_interpolates_inside_the_bucket_that_holds_it():
    buckets = [(0.01, 50.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.055)


def test_histogram_quantile_in_the_overflow_bucket_is_the_last_finite_bound():
    assert histogram_quantile([(0.1, 10.0), (math.inf, 20.0)], 0.99) == pytest.approx(0.1)


def test_triton_load_gives_the_mean_batch_and_queue_against_compute_time_per_request_of_this_run_only():
    delta = counter_delta(parse_samples(TRITON_BEFORE), parse_samples(TRITON_AFTER))
    (load,) = triton_loads(delta, triton_stats({1: 100}), triton_stats({1: 150, 4: 250}))
    assert (load.requests, load.inferences, load.executions) == (400, 1200, 300)
    assert load.mean_batch == pytest.approx(4.0)
    assert load.queue_ms == pytest.approx(5.0)  # 2 s of queueing over 400 requests
    assert load.compute_ms == pytest.approx(9.975)  # 3.99 s of compute over 400 requests
    assert load.batch_sizes == {1: 50, 4: 250}


def test_history_throughput_comes_from_the_totals_and_percentiles_before_the_first_response_are_missing(tmp_path):
    points = read_history(write_report_dir(tmp_path) / "locust_stats_history.csv")
    assert [p.elapsed_s for p in points] == [0, 1, 3, 10]
    assert [p.rps for p in points] == [0.0, 30.0, 40.0, 290 / 7]
    assert points[2].failures_per_s == pytest.approx(1.0)
    assert math.isnan(points[0].p99_ms) and points[1].p99_ms == 100


def test_summary_says_how_much_was_served_and_where_the_time_went(tmp_path):
    summary = build_summary(write_report_dir(tmp_path), target="gateway", settings={"users": "4"})
    assert summary.total.requests == 400 and summary.total.failures == 2
    assert summary.gateway_statuses == {"200": 398, "429": 2}
    (total_stage,) = summary.stages
    assert total_stage.count == 400 and total_stage.mean_ms == pytest.approx(30.0)
    text = render_markdown(summary, [])
    assert "40.0 requests/s" in text and "p99 120.0 ms" in text
    assert "mean batch 4.00" in text and "5.0 ms waiting in the queue" in text
    assert "| 3-4 | 250 | 83% | 95% |" in text


def test_thresholds_fail_on_the_failure_ratio_and_on_p99(tmp_path):
    summary = build_summary(write_report_dir(tmp_path, failures=8, p99_ms=400), target="gateway", settings={})
    problems = check_thresholds(summary, Thresholds(max_fail_ratio=0.01, max_p99_ms=300))
    assert len(problems) == 2
    assert "failure ratio 2.00%" in problems[0] and "p99 400 ms" in problems[1]
    assert check_thresholds(summary, Thresholds(max_fail_ratio=0.05, max_p99_ms=500)) == []


def test_a_run_without_any_completed_request_does_not_pass(tmp_path):
    summary = build_summary(write_report_dir(tmp_path, requests=0, failures=0), target="gateway", settings={})
    assert check_thresholds(summary, Thresholds()) == ["no request completed"]


def test_batch_sizes_are_grouped_in_powers_of_two_with_their_executions_and_images():
    ranges = batch_size_ranges({1: 5, 2: 3, 3: 1, 4: 2, 5: 1, 8: 1, 17: 2, 32: 1})
    assert ranges == {"1": (5, 5), "2": (3, 6), "3-4": (3, 11), "5-8": (2, 13), "17-32": (3, 66)}


def test_latency_plot_is_a_png(tmp_path):
    summary = build_summary(write_report_dir(tmp_path), target="gateway", settings={})
    plot_latency(summary, tmp_path / "latency.png", max_p99_ms=200)
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ramp_step_percentile_counts_only_the_responses_of_that_step():
    before = {10: 100, 500: 1}
    after = {10: 150, 20: 49, 500: 2}
    assert step_percentile(before, after, 0.5) == 10.0  # 50 at 10 ms, 49 at 20 ms, 1 at 500 ms
    assert step_percentile(before, after, 0.6) == 20.0
    assert step_percentile(before, after, 0.99) == 20.0
    assert step_percentile(before, after, 1.0) == 500.0
    assert step_percentile(after, after, 0.99) is None


def test_saturation_is_the_fastest_step_within_the_budget():
    ramp = {
        "budget_ms": 100,
        "steps": [
            {"users": 2, "rps": 50.0, "within_budget": True},
            {"users": 4, "rps": 80.0, "within_budget": True},
            {"users": 6, "rps": 85.0, "within_budget": False},
        ],
    }
    assert saturation_step(ramp)["users"] == 4
    assert saturation_step({"steps": [{"users": 2, "rps": 5.0, "within_budget": False}]}) is None


@pytest.mark.parametrize("address", ["http://127.0.0.1:8080", "localhost:8001", "http://[::1]:8080"])
def test_loopback_targets_are_accepted(address):
    require_loopback(address)


@pytest.mark.parametrize("address", ["http://10.1.2.3:8080", "192.0.2.7:8001", "http://0.0.0.0:8080"])
def test_targets_off_this_machine_are_refused(address):
    with pytest.raises(TargetRefused, match="not a loopback address"):
        require_loopback(address)


def test_the_runner_refuses_a_remote_gateway_before_starting_anything(tmp_path, capsys):
    code = run_main(["--gateway-url", "http://192.0.2.7:8080", "--reports", str(tmp_path / "reports")])
    assert code == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("value", ["30s", "2m", "1m30s", "45"])
def test_durations_in_locust_spelling_are_accepted(value):
    assert run_parser().parse_args(["--duration", value]).duration == value


def test_a_duration_locust_would_not_understand_is_refused(capsys):
    with pytest.raises(SystemExit):
        run_parser().parse_args(["--duration", "ten seconds"])
    assert "not a duration" in capsys.readouterr().err


def test_a_ramp_that_never_crossed_the_budget_does_not_claim_saturation():
    from loadtests.render import _ramp_section

    capped = {
        "budget_ms": 100,
        "steps": [{"users": 2, "rps": 5.0, "p50_ms": 10, "p99_ms": 20, "failures": 0, "within_budget": True}],
    }
    assert "saturation is above **5.0 requests/s**" in "\n".join(_ramp_section(capped))
    crossed = {
        "budget_ms": 100,
        "steps": [
            *capped["steps"],
            {"users": 4, "rps": 6.0, "p50_ms": 90, "p99_ms": 200, "failures": 0, "within_budget": False},
        ],
    }
    assert "Saturation: **5.0 requests/s at 2 users**" in "\n".join(_ramp_section(crossed))
