"""The Triton replica pool: which replica an inference goes to, failover, DNS membership, all-down fallback.

Each replica's TritonClient is replaced by a double of that interface (no Triton, no network)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from server import replicas as replicas_module
from server.errors import TritonUnavailable
from server.replicas import ReplicaPool


class ReplicaClient:
    """The TritonClient calls the pool makes; `infer` answers its replica's url, or fails as unreachable."""

    def __init__(self, url: str, **options) -> None:
        self.url = url
        self.unreachable = False
        self.ready = True
        self.closed = False
        self.gate: asyncio.Event | None = None  # set: infer waits for it
        self.inferences = 0

    async def server_ready(self) -> bool:
        return self.ready

    async def register_region(self) -> None:
        pass

    def forget_region(self) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    async def infer(self, info, batch, version: str = "", slot=None) -> str:
        self.inferences += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.unreachable:
            raise TritonUnavailable(f"{self.url} is unreachable")
        return self.url


@pytest.fixture(autouse=True)
def replica_clients(monkeypatch):
    monkeypatch.setattr(replicas_module, "TritonClient", ReplicaClient)


def client(pool: ReplicaPool, url: str) -> ReplicaClient:
    return pool.replicas[url].client


def test_an_inference_goes_to_the_replica_with_the_fewest_in_flight():
    async def scenario():
        pool = ReplicaPool("a:1,b:1,c:1")
        for url in ("a:1", "b:1"):
            client(pool, url).gate = asyncio.Event()
        # The first two are held by a and b (fewest at the time, then the next); the third goes to c.
        held = [asyncio.create_task(pool.infer(None, None)) for _ in range(2)]
        await asyncio.sleep(0)
        assert {url: r.outstanding for url, r in pool.replicas.items()} == {"a:1": 1, "b:1": 1, "c:1": 0}
        assert await pool.infer(None, None) == "c:1"
        client(pool, "a:1").gate.set()
        assert await held[0] == "a:1"
        # a is free again, b still busy: the next goes to a (the first of the least outstanding).
        assert await pool.infer(None, None) == "a:1"
        client(pool, "b:1").gate.set()
        assert await held[1] == "b:1"
        assert all(r.outstanding == 0 for r in pool.replicas.values())

    asyncio.run(scenario())


def test_an_unreachable_replica_is_marked_down_and_the_inference_retried_once_on_another():
    async def scenario():
        pool = ReplicaPool("a:1,b:1,c:1")
        client(pool, "a:1").unreachable = True
        assert await pool.infer(None, None) == "b:1"
        assert not pool.replicas["a:1"].healthy and pool.replicas["b:1"].healthy
        # Down replicas are skipped while a healthy one is left.
        assert await pool.infer(None, None) in ("b:1", "c:1")
        assert client(pool, "a:1").inferences == 1

    asyncio.run(scenario())


def test_the_retry_is_only_once():
    async def scenario():
        pool = ReplicaPool("a:1,b:1,c:1")
        for url in pool.replicas:
            client(pool, url).unreachable = True
        with pytest.raises(TritonUnavailable):
            await pool.infer(None, None)
        assert sum(client(pool, url).inferences for url in pool.replicas) == 2

    asyncio.run(scenario())


def test_with_none_healthy_the_replica_down_longest_is_tried():
    async def scenario():
        pool = ReplicaPool("a:1,b:1,c:1")
        for url in ("b:1", "c:1", "a:1"):  # b went down first, a last
            client(pool, url).unreachable = True
            pool._mark_down(pool.replicas[url])
            await asyncio.sleep(0.002)
        client(pool, "b:1").unreachable = False
        assert await pool.infer(None, None) == "b:1"
        assert client(pool, "a:1").inferences == client(pool, "c:1").inferences == 0
        # The one down longest fails again: the retry goes to the next down longest.
        client(pool, "b:1").unreachable = True
        client(pool, "c:1").unreachable = False
        assert await pool.infer(None, None) == "c:1"
        assert client(pool, "a:1").inferences == 0

    asyncio.run(scenario())


def test_replicas_behind_a_dns_name_join_and_leave_as_the_name_resolves(monkeypatch):
    addresses = ["10.0.0.1", "10.0.0.2"]

    async def getaddrinfo(host, port, *, type=0, **kwargs):
        assert host == "triton-headless" and port == 8001
        return [(socket.AF_INET, type, 6, "", (address, port)) for address in addresses]

    async def replicas_become(pool: ReplicaPool, wanted: set[str]) -> None:
        for _ in range(500):
            if set(pool.replicas) == wanted:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"replicas {sorted(pool.replicas)}, expected {sorted(wanted)}")

    async def scenario():
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        pool = ReplicaPool("dns:///triton-headless:8001", probe_interval_s=0.01)
        assert pool.replicas == {}
        await pool.start()
        try:
            assert set(pool.replicas) == {"10.0.0.1:8001", "10.0.0.2:8001"}
            leaving = client(pool, "10.0.0.1:8001")
            addresses[:] = ["10.0.0.2", "10.0.0.3"]
            await replicas_become(pool, {"10.0.0.2:8001", "10.0.0.3:8001"})
            assert leaving.closed
            assert await pool.infer(None, None) in pool.replicas
            addresses[:] = []  # a name that resolves to nothing leaves no replica
            await replicas_become(pool, set())
            with pytest.raises(TritonUnavailable):
                await pool.infer(None, None)
        finally:
            await pool.close()

    asyncio.run(scenario())
