"""`python -m server`: how many workers, the uvicorn options read from the settings, and bad settings."""

import os
import subprocess
import sys

import pytest

from server import serve
from server.metrics import GatewayMetrics
from server.settings import Settings
from server.shared_memory import InputRegion, SharedMemoryUnavailable


def test_the_default_is_one_worker_per_core_this_process_may_use_at_most_eight(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert serve.default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    assert serve.default_workers() == serve.MAX_DEFAULT_WORKERS == 8


def test_uvicorn_runs_with_the_settings_options():
    settings = Settings(host="0.0.0.0", port=8123, max_connections=7)
    one = serve.uvicorn_config(settings, 1)
    assert (one.host, one.port, one.limit_concurrency, one.workers, one.loop) == ("0.0.0.0", 8123, 7, 1, "asyncio")
    assert one.app == "server.app:create_app"
    several = serve.uvicorn_config(settings, 3)
    # Workers build the app through worker_app, which ties them to the supervisor's life.
    assert (several.workers, several.app, several.limit_concurrency) == (3, "server.serve:worker_app", 7)


@pytest.mark.spawns
@pytest.mark.parametrize(
    "env, named",
    [
        ({"GATEWAY_WORKERS": "0"}, "GATEWAY_WORKERS"),
        ({"GATEWAY_MAX_CONNECTIONS": "0"}, "GATEWAY_MAX_CONNECTIONS"),
        ({"GATEWAY_API_KEYS": " , "}, "GATEWAY_API_KEYS"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2_before_anything_listens(env, named):
    done = subprocess.run(
        [sys.executable, "-m", "server"],
        env={**os.environ, **env, "GATEWAY_PORT": "1"},  # port 1 would fail to bind were it reached
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr


def test_the_free_slots_gauge_follows_the_region_in_multiprocess_mode_too():
    # A gauge in multiprocess mode cannot call a function at scrape time: the region tells it each change.
    metrics = GatewayMetrics()
    try:
        region = InputRegion(2, 1024)
    except SharedMemoryUnavailable as e:
        pytest.skip(f"no /dev/shm here: {e}")
    try:
        region.on_change = metrics.shared_memory_free_slots.set
        taken = region.acquire((4,), "float32")
        assert taken is not None
        assert metrics.registry.get_sample_value("gateway_shared_memory_free_slots") == 1
        region.release(taken[0])
        assert metrics.registry.get_sample_value("gateway_shared_memory_free_slots") == 2
    finally:
        region.close()


def test_region_names_hold_the_process_group_and_the_pid():
    try:
        region = InputRegion(1, 64)
    except SharedMemoryUnavailable as e:
        pytest.skip(f"no /dev/shm here: {e}")
    try:
        assert region.name.startswith(f"gateway-{os.getpgrp()}-{os.getpid()}-")
    finally:
        region.close()
