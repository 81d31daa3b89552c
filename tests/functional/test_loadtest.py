"""`python -m loadtests.run`: headless locust against the real stack on loopback, and the report it leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "digits"


def run_loadtest(tmp_path: Path, triton, gateway, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    reports = tmp_path / "reports"
    command = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--model",
        MODEL,
        "--reports",
        str(reports),
        "--gateway-url",
        gateway.url,
        "--triton-http",
        triton.http_url,
        "--triton-grpc",
        triton.grpc_url,
        "--triton-metrics",
        triton.metrics_url,
        "--images",
        str(tmp_path / "images"),
        *args,
    ]
    # cwd: locust imports the `loadtests` package from the working directory, as `make loadtest` does.
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    folders = sorted(reports.iterdir()) if reports.exists() else []
    assert len(folders) == 1, finished.stderr[-3000:]
    return finished, folders[0]


def test_ten_seconds_of_locust_on_the_gateway_serve_every_request_and_leave_the_whole_report(
    tmp_path, triton, gateway, photos
):
    images = tmp_path / "images"
    images.mkdir()
    for photo in photos:
        (images / photo.name).write_bytes(photo.read_bytes())

    finished, report = run_loadtest(
        tmp_path, triton, gateway, "--users", "3", "--spawn-rate", "3", "--duration", "10s", "--fail-ratio", "0"
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust.html",
        "summary.md",
        "summary.json",
        "latency.png",
        "metrics-before/gateway.prom",
        "metrics-before/triton.prom",
        "metrics-after/gateway.prom",
        "metrics-after/triton.prom",
        "metrics-after/triton-stats.json",
    ):
        assert (report / name).is_file(), name
    summary = json.loads((report / "summary.json").read_text())
    assert summary["total"]["requests"] > 0
    assert summary["total"]["failures"] == 0
    # Every scenario ran, and the servers' own counters saw the traffic.
    assert {r["name"] for r in summary["requests"]} == {"classify raw", "classify multipart", "classify multipart x4"}
    assert summary["gateway_statuses"] == {"200": sum(summary["gateway_statuses"].values())}
    (triton_load,) = summary["triton"]
    assert triton_load["model"] == MODEL and triton_load["inferences"] >= summary["total"]["requests"]
    # The batch-size table comes from Triton's statistics API, which restarts when the model reloads
    # (poll mode may reload it once just after start); the Prometheus counters do not.
    assert 0 < sum(triton_load["batch_sizes"].values()) <= triton_load["executions"]
    assert (report / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "Where the time goes" in (report / "summary.md").read_text()


def sample_images(tmp_path: Path, photos) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for photo in photos[:3]:
        (images / photo.name).write_bytes(photo.read_bytes())


def test_a_missed_threshold_exits_1_and_still_leaves_the_report(tmp_path, triton, gateway, photos):
    sample_images(tmp_path, photos)
    # No request is answered within a microsecond: the p99 threshold is missed for sure.
    finished, report = run_loadtest(
        tmp_path, triton, gateway, "--users", "1", "--spawn-rate", "1", "--duration", "3s", "--max-p99-ms", "0.001"
    )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "threshold exceeded" in finished.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["total"]["requests"] > 0 and summary["total"]["failures"] == 0
    (problem,) = summary["problems"]
    assert "p99" in problem


def gateway_answers(gateway) -> float:
    from .conftest import metric

    return metric(gateway.url, "gateway_requests_total", model=MODEL, status="200") or 0.0


def test_target_triton_loads_triton_directly_and_not_the_gateway(tmp_path, triton, gateway, photos):
    sample_images(tmp_path, photos)
    before = gateway_answers(gateway)
    finished, report = run_loadtest(
        tmp_path,
        triton,
        gateway,
        "--target",
        "triton",
        "--users",
        "2",
        "--spawn-rate",
        "2",
        "--duration",
        "3s",
        "--fail-ratio",
        "0",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["total"]["requests"] > 0 and summary["total"]["failures"] == 0
    (triton_load,) = summary["triton"]
    assert triton_load["inferences"] >= summary["total"]["requests"]
    assert gateway_answers(gateway) == before


def test_the_ramp_steps_users_up_to_its_limit_and_records_each_step(tmp_path, triton, gateway, photos, monkeypatch):
    sample_images(tmp_path, photos)
    # Short steps and no warm-up: two steps of one second each, then the user limit ends the ramp.
    monkeypatch.setenv("LOADTEST_RAMP_SETTLE_S", "0.5")
    monkeypatch.setenv("LOADTEST_RAMP_WARMUP_S", "0")
    finished, report = run_loadtest(
        tmp_path,
        triton,
        gateway,
        "--ramp",
        "--ramp-step-users",
        "1",
        "--ramp-step-s",
        "1",
        "--ramp-max-users",
        "2",
        "--p99-budget-ms",
        "60000",
        "--duration",
        "30s",
        "--fail-ratio",
        "0",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    ramp = json.loads((report / "ramp.json").read_text())
    assert [step["users"] for step in ramp["steps"]] == [1, 2]
    assert all(step["within_budget"] and step["requests"] > 0 for step in ramp["steps"])
