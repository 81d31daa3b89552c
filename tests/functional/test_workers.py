"""The gateway in two worker processes on one port (GATEWAY_WORKERS=2), against the real Triton.

Which worker takes a connection is the kernel's choice; to send requests to one worker, the test stops the
other (SIGSTOP), so that only one can accept, and lets it go on afterwards (SIGCONT). A stopped worker
misses its supervisor's health checks, which give it 5 s; each stop here lasts a few requests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from builder.publish import PublishSettings, publish
from server.drain import longest_request_s
from server.settings import Settings
from server.shared_memory import SHM_DIRECTORY
from stack.launcher import GatewayProcess

from .conftest import MODEL, gateway_regions, metric, start_gateway, start_triton
from .test_drain import exit_code, status_of
from .test_failures import wait_for
from .test_gateway import encoded, post, triton_pending

SLOTS = 4  # shared-memory slots per worker
HOLD_S = 20  # the slow model keeps a request this long in its batcher's queue
DRAIN_S = 12
TRITON_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack(tiny_run, tmp_path_factory):
    """Triton serving the digits model and `slow`, whose queue (of up to 4) holds a request 20 s."""
    folder = tmp_path_factory.mktemp("workers")
    publish(tiny_run / "model.onnx", folder / "repo", MODEL)
    publish(
        tiny_run / "model.onnx",
        folder / "repo",
        "slow",
        settings=PublishSettings(
            max_batch_size=32, preferred_batch_sizes=(32,), max_queue_delay_us=HOLD_S * 1_000_000, max_queue_size=4
        ),
    )
    server = start_triton(folder / "repo", folder / "cache")
    yield server, folder
    server.stop()


def workers_of(gateway: GatewayProcess) -> list[int]:
    """The pids of the gateway's worker processes (its children but multiprocessing's resource tracker)."""
    workers = []
    for child in psutil.Process(gateway.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child.pid)
        except psutil.Error:
            continue  # gone meanwhile (a worker killed, not yet collected by the supervisor)
    return sorted(workers)


def serving(gateway: GatewayProcess, triton_grpc_url: str) -> list[int] | None:
    """The two workers once both serve: each has registered its own region with Triton; else None."""
    workers = workers_of(gateway)
    regions = gateway_regions(triton_grpc_url, gateway)
    # The region of a worker that died stays registered until the next worker registers its own.
    live = [r for r in regions if os.path.exists(os.path.join(SHM_DIRECTORY, r))]
    owners = sorted(int(name.split("-")[2]) for name in live)
    return workers if len(workers) == 2 and owners == workers else None


def start_two_workers(server, log_path: Path, **env: str) -> tuple[GatewayProcess, list[int]]:
    gateway = start_gateway(
        server.grpc_url,
        log_path,
        server.http_url,
        GATEWAY_WORKERS="2",
        GATEWAY_SHARED_MEMORY_SLOTS=str(SLOTS),
        **env,
    )
    workers: list[int] | None = None

    def both_serve() -> bool:
        nonlocal workers
        workers = serving(gateway, server.grpc_url)
        return workers is not None

    assert wait_for(both_serve, 60), gateway.log_tail()
    assert workers is not None
    return gateway, workers


@contextlib.contextmanager
def only(worker: int, workers: list[int]) -> Iterator[None]:
    """Only `worker` accepts connections meanwhile: the others are stopped."""
    others = [w for w in workers if w != worker]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def classify(url: str, model: str = MODEL) -> httpx.Response:
    # A new connection each time (httpx.post opens its own), so that the worker that accepts it answers.
    return post(url, f"/v1/models/{model}/classify", content=encoded("L", "PNG"), headers={"Content-Type": "image/png"})


def test_metrics_are_summed_over_the_workers_and_a_dead_workers_live_gauges_dropped(stack):
    server, folder = stack
    gateway, (first, second) = start_two_workers(server, folder / "gateway-metrics.log")
    try:
        with only(first, [first, second]):
            assert [classify(gateway.url).status_code for _ in range(3)] == [200] * 3
        with only(second, [first, second]):
            assert [classify(gateway.url).status_code for _ in range(2)] == [200] * 2
        # Whichever worker answers the scrape, it counts what both did: 3 + 2.
        for worker in (first, second):
            with only(worker, [first, second]):
                assert metric(gateway.url, "gateway_requests_total", model=MODEL, status="200") == 5
                assert metric(gateway.url, "gateway_images_total", model=MODEL) == 5
                assert metric(gateway.url, "gateway_shared_memory_free_slots") == 2 * SLOTS
                assert metric(gateway.url, "gateway_in_flight_requests") == 0

        os.kill(first, signal.SIGKILL)
        replaced: list[int] | None = None

        def replaced_and_serving() -> bool:
            nonlocal replaced
            replaced = serving(gateway, server.grpc_url)
            return replaced is not None and first not in replaced

        assert wait_for(replaced_and_serving, 60), gateway.log_tail()
        # The dead worker's counts stay; its free slots are no longer counted, the new worker's are.
        assert metric(gateway.url, "gateway_requests_total", model=MODEL, status="200") == 5
        assert metric(gateway.url, "gateway_shared_memory_free_slots") == 2 * SLOTS
        # Its region is gone from /dev/shm (and, once the new worker registered, from Triton).
        assert not list(Path(SHM_DIRECTORY).glob(f"gateway-{gateway.pid}-{first}-*"))
        assert classify(gateway.url).status_code == 200
    finally:
        gateway.stop()
    assert not list(Path(SHM_DIRECTORY).glob(f"gateway-{gateway.pid}-*"))


def test_sigterm_to_the_supervisor_drains_every_worker_and_exits_0(stack):
    server, folder = stack
    gateway, workers = start_two_workers(
        server,
        folder / "gateway-drain.log",
        GATEWAY_DRAIN_S=str(DRAIN_S),
        GATEWAY_TRITON_TIMEOUT_S=str(TRITON_TIMEOUT_S),
    )
    answered: list[httpx.Response] = []
    senders = [threading.Thread(target=lambda: answered.append(classify(gateway.url, "slow"))) for _ in workers]
    try:
        assert wait_for(lambda: triton_pending(server) == 0, 30)
        # One request held in Triton's queue through each worker.
        for held, (worker, sender) in enumerate(zip(workers, senders, strict=True), start=1):
            with only(worker, workers):
                sender.start()
                assert wait_for(lambda held=held: triton_pending(server) == held, 15), gateway.log_tail()
        # As Kubernetes and `docker stop` do: to the supervisor alone, which passes it on to each worker.
        os.kill(gateway.pid, signal.SIGTERM)
        for worker in workers:
            with only(worker, workers):
                assert wait_for(lambda: status_of(f"{gateway.url}/readyz") == 503, DRAIN_S), gateway.log_tail()
                refused = classify(gateway.url)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
        for sender in senders:
            sender.join(HOLD_S + TRITON_TIMEOUT_S)
        assert [r.status_code for r in answered] == [200, 200], [r.text for r in answered]
        bound = DRAIN_S + longest_request_s(Settings(triton_timeout_s=TRITON_TIMEOUT_S))
        assert exit_code(gateway, bound) == 0, gateway.log_tail()
    finally:
        gateway.stop()
        for sender in senders:
            if sender.is_alive():
                sender.join(HOLD_S + TRITON_TIMEOUT_S)


def test_the_supervisor_stops_listening_when_the_drain_ends_and_no_connection_is_reset(stack):
    """During the drain the workers answer new connections; when it ends the kernel completes no more on
    the shared socket and every copy of it closes, the supervisor's too. Kept open, the supervisor's copy
    would go on listening after the workers close theirs: the kernel would complete connections no worker
    accepts, and reset them when the supervisor exits (seen: 9 to 13 resets per stop under load)."""
    server, folder = stack
    gateway, _ = start_two_workers(server, folder / "gateway-stop.log", GATEWAY_DRAIN_S="2")
    supervisor = psutil.Process(gateway.pid)

    def listening() -> bool:
        try:
            connections = supervisor.net_connections("tcp")
        except psutil.NoSuchProcess:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == gateway.port for c in connections)

    outcomes: list[str] = []
    try:
        assert listening()
        os.kill(gateway.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while gateway._process.poll() is None and time.monotonic() < deadline:
            outcomes.append(one_request("127.0.0.1", gateway.port))
            time.sleep(0.01)
        assert gateway._process.poll() == 0, gateway.log_tail()
        assert "answered" in outcomes and "refused" in outcomes and "reset" not in outcomes, Counter(outcomes)
        assert outcomes.index("refused") > outcomes.index("answered")  # answered first, while draining
    finally:
        gateway.stop()


def one_request(host: str, port: int) -> str:
    """A GET /healthz on a new connection: answered, refused (no connection), or reset (connected, no answer)."""
    try:
        connection = socket.create_connection((host, port), timeout=5)
    except OSError:
        return "refused"
    try:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        return "answered" if connection.recv(65536).startswith(b"HTTP/1.1 ") else "reset"
    except OSError:
        return "reset"
    finally:
        connection.close()
