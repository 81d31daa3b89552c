"""The gateway bench's arithmetic: medians over rounds, pooled percentiles, and the target lines."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
from rich.console import Console

from benchmarks.gateway import (
    CEILING,
    GATEWAY,
    TRITON,
    Run,
    gateway_path,
    per_core_lines,
    process_tree_cpu_s,
    report,
    stage_cpu_ms,
    summarize,
)


def test_summary_takes_the_median_rate_and_pools_latencies_over_rounds():
    runs = [Run(100, 1.0, [0.010] * 100), Run(50, 1.0, [0.030] * 50), Run(90, 1.0, [0.020] * 90)]
    result = summarize(GATEWAY, 16, runs)
    assert result.images_per_s == pytest.approx(90.0)  # the median, not the mean (80)
    assert (result.images_per_s_min, result.images_per_s_max) == (50.0, 100.0)
    assert result.requests == 240 and result.rounds == 3
    assert result.p50_ms == pytest.approx(20.0)  # the middle of all 240 latencies
    assert result.p99_ms == pytest.approx(30.0)


def test_report_states_both_targets_against_the_ceiling():
    results = [
        summarize(CEILING, 1, [Run(800, 6.0, [0.06] * 100)]),  # 133.3 images/s
        summarize(TRITON, 1, [Run(80, 1.0, [0.012] * 80)]),
        summarize(GATEWAY, 1, [Run(60, 1.0, [0.0165] * 60)]),
        summarize(TRITON, 16, [Run(110, 1.0, [0.14] * 110)]),
        summarize(GATEWAY, 16, [Run(100, 1.0, [0.16] * 100)]),
    ]
    out = io.StringIO()
    report(results, Console(file=out, width=200))
    text = out.getvalue()
    assert "concurrency 16: 75.0% of the model-only ceiling (target >= 75%: met)" in text
    assert "Triton direct p50: 4.5 ms (target <= 5 ms: met)" in text
    # A hair under the target is a miss, not a rounded-up pass; so is a gap over 5 ms.
    results[-1] = summarize(GATEWAY, 16, [Run(99, 1.0, [0.16] * 99)])
    results[2] = summarize(GATEWAY, 1, [Run(60, 1.0, [0.0171] * 60)])
    out = io.StringIO()
    report(results, Console(file=out, width=200))
    text = out.getvalue()
    assert "concurrency 16: 74.2% of the model-only ceiling (target >= 75%: missed)" in text
    assert "Triton direct p50: 5.1 ms (target <= 5 ms: missed)" in text


def test_report_leaves_out_target_lines_without_their_runs():
    results = [
        summarize(CEILING, 1, [Run(800, 6.0, [0.06] * 100)]),
        summarize(TRITON, 4, [Run(90, 1.0, [0.04] * 90)]),
        summarize(GATEWAY, 4, [Run(70, 1.0, [0.05] * 70)]),
    ]
    out = io.StringIO()
    report(results, Console(file=out, width=200))
    assert "target" not in out.getvalue()


def test_cpu_per_image_sums_over_rounds():
    runs = [
        Run(100, 1.0, [0.01] * 100, {"Triton": 1.6, "gateway": 0.3}),
        Run(50, 1.0, [0.02] * 50, {"Triton": 0.8, "gateway": 0.2}),
    ]
    result = summarize(GATEWAY, 16, runs)
    assert result.cpu_ms_per_image == pytest.approx({"Triton": 16.0, "gateway": 10 / 3})


@pytest.mark.spawns
def test_process_tree_cpu_counts_children():
    # The parent only sleeps; its child burns 0.3 s of CPU, which the tree's total must include.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess, sys, time\n"
                "child = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
                "while time.process_time() - t < 0.3: pass\\ntime.sleep(30)'])\n"
                "time.sleep(30)\n"
            ),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while process_tree_cpu_s(parent.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_tree_cpu_s(parent.pid) >= 0.3
        assert process_tree_cpu_s(os.getpid()) > 0
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()


def test_the_load_generator_counts_its_own_cpu():
    import asyncio

    from benchmarks.gateway import CLIENT, with_cpu

    async def busy_measurement() -> Run:
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:
            pass
        return Run(10, 0.2, [0.02] * 10)

    run = asyncio.run(with_cpu({}, busy_measurement()))
    assert 0.2 <= run.cpu_s[CLIENT] < 1.0


def test_per_core_lines_split_the_gateways_cpu_by_stage_and_give_images_per_second_per_core():
    results = [
        summarize(TRITON, 8, [Run(100, 1.0, [0.01] * 100, {"Triton": 1.0, "gateway": 0.0})]),
        summarize(gateway_path(2), 8, [Run(100, 1.0, [0.01] * 100, {"Triton": 1.0, "gateway": 0.5})]),
    ]
    (line,) = per_core_lines(results, {"decode": 1.5, "resize and normalize": 1.0})
    assert line.startswith("gateway, 2 workers at concurrency 8: gateway CPU 5.00 ms/image")
    assert "decode 1.50, resize and normalize 1.00, HTTP, routing, the Triton call, metrics and log 2.50" in line
    assert line.endswith("200 images/s per gateway core")
    assert gateway_path(None) == GATEWAY and gateway_path(1) == "gateway, 1 worker"


def test_stage_cpu_is_measured_on_real_photos(photos):
    from benchmarks.gateway import IMAGENET

    stages = stage_cpu_ms([photos[0].read_bytes()], IMAGENET, pixel_input=False, repeats=2)
    assert set(stages) == {"decode", "resize and normalize"} and all(ms > 0 for ms in stages.values())


def test_photo_side_scales_every_bench_photo_to_that_longer_side():
    from PIL import Image

    from benchmarks.gateway import sample_jpegs

    sizes = [Image.open(io.BytesIO(data)).size for data in sample_jpegs(1400)]
    assert len(sizes) == 5 and all(max(size) == 1400 for size in sizes)
    assert all(max(Image.open(io.BytesIO(data)).size) < 1400 for data in sample_jpegs())


def test_jpeg_draft_compare_starts_gateways_of_its_own_so_it_excludes_workers(monkeypatch, capsys):
    from benchmarks.gateway import main

    monkeypatch.setattr(sys, "argv", ["gateway.py", "--jpeg-draft", "compare", "--workers", "1"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2 and "give one of them" in capsys.readouterr().err
