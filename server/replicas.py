"""Several Triton replicas behind one gateway: least-outstanding-requests routing, health-aware, with failover.

gRPC keeps one long-lived connection, so a plain Kubernetes Service pins a gateway to one Triton
pod. The pool takes a list of endpoints (`host:port,host:port`), or a DNS name it re-resolves
(`dns:///triton-headless:8001`, a headless Service), and sends each inference to the healthy
replica with the fewest requests in flight. A replica that fails to answer is marked down and
probed until it is ready again; an inference that failed because its replica was unreachable is
retried once on another (classification has no side effects).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from opentelemetry.trace import Tracer

from .errors import TritonUnavailable
from .shared_memory import InputRegion, Slot
from .triton import RETRY_AFTER_S, Inference, ModelInfo, TritonClient

log = logging.getLogger(__name__)
DNS_PREFIX = "dns:///"


@dataclass
class Replica:
    url: str
    client: TritonClient
    outstanding: int = 0
    healthy: bool = True
    down_since: float = field(default=0.0)


def parse_endpoints(spec: str) -> tuple[list[str], str | None]:
    """`a:8001,b:8001` -> ([a:8001, b:8001], None); `dns:///name:8001` -> ([], "name:8001")."""
    spec = spec.strip()
    if spec.startswith(DNS_PREFIX):
        return [], spec[len(DNS_PREFIX) :]
    endpoints = [part.strip() for part in spec.split(",") if part.strip()]
    if not endpoints:
        raise ValueError("no Triton endpoint given")
    return endpoints, None


class ReplicaPool:
    """The TritonClient interface over one or more replicas."""

    def __init__(
        self,
        spec: str,
        *,
        protocol: str = "grpc",
        timeout_s: float = 10.0,
        info_ttl_s: float = 5.0,
        repository_key: str | None = None,
        probe_interval_s: float = 2.0,
        region: InputRegion | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._new_client = partial(
            TritonClient,
            protocol=protocol,
            timeout_s=timeout_s,
            info_ttl_s=info_ttl_s,
            repository_key=repository_key,
            region=region,
            tracer=tracer,
        )
        self.probe_interval_s = probe_interval_s
        self.info_ttl_s = info_ttl_s  # server/degrade.py keeps a failed lookup as long
        endpoints, self.dns_name = parse_endpoints(spec)
        self.replicas: dict[str, Replica] = {}
        for url in endpoints:
            self._add(url)
        self._task: asyncio.Task | None = None

    def _add(self, url: str) -> None:
        self.replicas[url] = Replica(url, self._new_client(url))

    async def start(self) -> None:
        if self.dns_name:
            await self._resolve(self.dns_name)
        self._task = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        if self._task:
            # Awaited, so that no probe is midway through registering a region when the clients close.
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(r.client.close() for r in self.replicas.values()), return_exceptions=True)

    async def _resolve(self, dns_name: str) -> None:
        host, _, port = dns_name.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            log.warning("cannot resolve %s: %s", dns_name, e)
            return
        wanted = {f"{info[4][0]}:{port}" for info in infos}
        for url in wanted - self.replicas.keys():
            log.info("Triton replica %s joined", url)
            self._add(url)
        for url in set(self.replicas) - wanted:
            replica = self.replicas.pop(url)
            log.info("Triton replica %s left", url)
            await replica.client.close()

    async def _probe_forever(self) -> None:
        # The first round at once: it offers the shared-memory region without holding up the start.
        while True:
            await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values())))
            await asyncio.sleep(self.probe_interval_s)
            if self.dns_name:
                await self._resolve(self.dns_name)

    async def _probe(self, replica: Replica) -> None:
        ready = await replica.client.server_ready()
        self._set_health(replica, ready)
        if ready:
            await replica.client.register_region()  # a no-op once registered, or refused

    def _set_health(self, replica: Replica, ready: bool) -> None:
        if ready != replica.healthy:
            log.warning("Triton replica %s is %s", replica.url, "back" if ready else "down")
            if ready:
                replica.client.forget_region()  # a restarted Triton has lost it, and may now accept it
        replica.healthy = ready

    def _mark_down(self, replica: Replica) -> None:
        if replica.healthy:
            log.warning("Triton replica %s is down", replica.url)
        replica.healthy, replica.down_since = False, time.monotonic()

    def _choose(self, exclude: AbstractSet[str] = frozenset()) -> Replica:
        candidates = [r for r in self.replicas.values() if r.url not in exclude]
        healthy = [r for r in candidates if r.healthy]
        # With none known healthy, try the one down longest rather than refusing outright.
        pool = healthy or sorted(candidates, key=lambda r: r.down_since)[:1]
        if not pool:
            raise TritonUnavailable("no Triton replica is available", retry_after_s=RETRY_AFTER_S)
        return min(pool, key=lambda r: r.outstanding)

    async def _on_one(self, method: str, *args, **kwargs):
        """Run a client call on the chosen replica; on an unreachable replica, once more on another."""
        tried: set[str] = set()
        for attempt in range(2):
            replica = self._choose(tried)
            replica.outstanding += 1
            try:
                return await getattr(replica.client, method)(*args, **kwargs)
            except TritonUnavailable:
                self._mark_down(replica)
                tried.add(replica.url)
                if attempt == 1 or len(tried) == len(self.replicas):
                    raise
            finally:
                replica.outstanding -= 1
        raise TritonUnavailable("no Triton replica is available", retry_after_s=RETRY_AFTER_S)

    async def server_ready(self) -> bool:
        results = await asyncio.gather(*(r.client.server_ready() for r in self.replicas.values()))
        for replica, ready in zip(self.replicas.values(), results):
            self._set_health(replica, ready)
        return any(results)

    async def repository_index(self) -> list[dict[str, str]]:
        return await self._on_one("repository_index")

    async def model_info(self, name: str) -> ModelInfo:
        return await self._on_one("model_info", name)

    def forget_model_info(self, name: str) -> None:
        for replica in self.replicas.values():
            replica.client.forget_model_info(name)

    async def statistics(self, name: str) -> dict:
        return await self._on_one("statistics", name)

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot: Slot | None = None) -> Inference:
        return await self._on_one("infer", info, batch, version, slot)
