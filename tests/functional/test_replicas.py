"""Two Triton replicas behind one gateway: load is spread, and one dying under load loses nothing else."""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from server.replicas import parse_endpoints

from .conftest import MODEL, start_gateway, start_triton
from .test_failures import post_png


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
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: post_png(gateway.url).status_code, range(40)))
        assert statuses == [200] * 40
        assert inference_count(first) > 0 and inference_count(second) > 0

        def keep_sending() -> list[int]:
            deadline, seen = time.monotonic() + 6, []
            while time.monotonic() < deadline:
                seen.append(post_png(gateway.url).status_code)
            return seen

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(keep_sending) for _ in range(4)]
            time.sleep(1.5)
            second.stop()
            during = [s for f in futures for s in f.result()]
        assert set(during) <= {200, 503} and during.count(200) > len(during) * 0.9
        after = [post_png(gateway.url).status_code for _ in range(10)]
        assert after == [200] * 10
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
    finally:
        gateway.stop()
        second.stop()
        first.stop()
