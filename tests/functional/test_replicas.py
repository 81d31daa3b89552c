"""Two Triton replicas behind one gateway: load is spread, and one dying under load loses nothing else."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx

from server.replicas import parse_endpoints

from .conftest import MODEL, start_gateway, start_triton
from .test_failures import post_png

CLIENTS = 4  # requests in flight at once


def inference_count(server) -> int:
    stats = httpx.get(f"http://{server.http_url}/v2/models/{MODEL}/stats", timeout=10).json()
    return sum(int(s["inference_count"]) for s in stats["model_stats"])


def test_endpoint_lists_and_dns_names_are_parsed():
    assert parse_endpoints("a:1, b:2") == (["a:1", "b:2"], None)
    assert parse_endpoints("dns:///triton-headless:8001") == ([], "triton-headless:8001")


def test_load_is_spread_and_a_replica_killed_under_load_costs_only_clean_503s(repository, tmp_path):
    first = start_triton(repository, tmp_path / "cache-a")
    second = start_triton(repository, tmp_path / "cache-b")
    gateway = start_gateway(f"{first.grpc_url},{second.grpc_url}", tmp_path / "gateway.log")
    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(pool.map(lambda _: post_png(gateway.url).status_code, range(40)))
        assert statuses == [200] * 40
        assert inference_count(first) > 0 and inference_count(second) > 0

        def keep_sending() -> list[httpx.Response]:
            deadline, seen = time.monotonic() + 6, []
            while time.monotonic() < deadline:
                seen.append(post_png(gateway.url))
            return seen

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(keep_sending) for _ in range(CLIENTS)]
            time.sleep(1.5)
            # The replica that takes most requests (the first wins ties on outstanding requests), killed
            # outright (the process group, stub included) mid-request: no graceful unload.
            os.killpg(first.pid, signal.SIGKILL)
            during = [r for f in futures for r in f.result()]
        statuses = [r.status_code for r in during]
        assert set(statuses) <= {200, 503}, statuses
        unavailable = [r for r in during if r.status_code == 503]
        for response in unavailable:
            assert response.headers["Retry-After"] and response.json()["error"]["code"] == "triton_unavailable"
        # The requests in flight on the dead replica, and those sent to it before it was marked down, are
        # retried once on the live one: none is lost. Without the retry, those in flight came back 503.
        assert len(unavailable) == 0, (len(unavailable), len(during))
        after = [post_png(gateway.url).status_code for _ in range(10)]
        assert after == [200] * 10
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
    finally:
        gateway.stop()
        second.stop()
        first.stop()
