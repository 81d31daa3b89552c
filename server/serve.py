"""`python -m server`: the gateway under uvicorn, in GATEWAY_WORKERS worker processes on one port.

One process serves from one event loop and one interpreter lock, so it uses little more than one core
whatever the machine has. With more than one worker, uvicorn's supervisor binds the port once and hands
the socket to each worker it spawns; the kernel spreads accepted connections over them. The supervisor
restarts a worker that dies and forwards SIGTERM and SIGINT to every worker, and each worker then
drains on its own as one gateway does (server/drain.py).

Each worker builds its own app: its own Triton connections, shared-memory region (named with its pid),
threads and limits. Their metrics meet in a folder made fresh for each start (prometheus-client's
multiprocess mode, PROMETHEUS_MULTIPROC_DIR), which is removed at exit; a worker that dies has its
live gauges dropped from it, its counters kept.

Settings are read and checked before anything listens: a bad one is one line on stderr and exit 2.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from multiprocessing import resource_tracker
from pathlib import Path
from socket import socket

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .drain import refuse_new_connections
from .settings import NoApiKeys, Settings, SettingsError, get_settings
from .shared_memory import REGION_PREFIX, SHM_DIRECTORY

log = logging.getLogger("uvicorn.error")  # the supervisor's own logger, configured by uvicorn
# The default worker count stops here: each worker holds its own connections, region and caches, and
# past one worker per core they only compete.
MAX_DEFAULT_WORKERS = 8
# Named with the supervisor's pid, so that whoever started it can remove the folder of one that was killed.
METRICS_DIR_PREFIX = "gateway-metrics-"


def default_workers() -> int:
    """One worker per core this process may run on (its CPU affinity, which taskset and cpusets narrow),
    at most MAX_DEFAULT_WORKERS. A container's CPU limit (a CFS quota) does not narrow the affinity: set
    GATEWAY_WORKERS there."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


def uvicorn_config(settings: Settings, workers: int) -> uvicorn.Config:
    app = "server.app:create_app" if workers == 1 else "server.serve:worker_app"
    # The stock asyncio loop: grpc.aio, which carries every Triton call, does not support uvloop. Past
    # GATEWAY_MAX_CONNECTIONS connections (or requests) a worker answers 503. Access lines would repeat
    # the gateway's own JSON request lines.
    return uvicorn.Config(
        app,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        loop="asyncio",
        limit_concurrency=settings.max_connections,
        log_level="warning",
        access_log=False,
    )


def _die_with_parent() -> None:
    # A worker whose supervisor is killed (SIGKILL, a crash) gets SIGTERM from the kernel, drains and
    # exits, instead of serving on as an orphan that holds the port.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_app() -> FastAPI:
    """The app in one worker process under the supervisor."""
    from .app import create_app

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor went before the line above took effect
        raise SystemExit("gateway: error: the worker supervisor exited")
    return create_app()


class Workers(Multiprocess):
    """uvicorn's worker supervisor; a worker it replaces also has its live gauges dropped from the metrics."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], metrics_dir: Path, drain_s: float) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.drain_s = drain_s

    def terminate_all(self) -> None:
        super().terminate_all()  # SIGTERM to each worker: each drains, then closes its copy of the listener
        # When the drain period ends, the kernel is told to complete no more connections on the shared
        # socket, while the workers accept what it completed before they close it (server/drain.py).
        # Then this process's copy is closed: kept, it would go on listening after the workers close theirs,
        # and what the kernel completed would be reset when this process exits.
        stop = threading.Timer(self.drain_s, self.close_listeners)
        stop.daemon = True
        stop.start()

    def close_listeners(self) -> None:
        for listener in self.sockets:
            refuse_new_connections(listener)
            listener.close()

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        super().keep_subprocess_alive()
        for process in before:
            if process not in self.processes and process.pid is not None:
                # Its counters stay (what it counted happened); its in-flight requests and free slots are gone.
                mark_process_dead(process.pid, str(self.metrics_dir))
                remove_worker_regions(process.pid)
                log.warning(
                    "gateway worker %d exited with code %s; another takes its place", process.pid, process.exitcode
                )


def remove_worker_regions(pid: int) -> None:
    """Unlink the shared-memory region of a worker that died. The resource tracker the workers share would
    unlink it only when the supervisor exits; the next worker to register its own has Triton drop it."""
    for path in Path(SHM_DIRECTORY).glob(f"{REGION_PREFIX}{os.getpgrp()}-{pid}-*"):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        resource_tracker.unregister(f"/{path.name}", "shared_memory")


def remove_metrics_dirs(pid: int) -> None:
    """Remove the metrics folders a supervisor of this pid made (one that was killed cannot)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}{pid}-*"):
        shutil.rmtree(path, ignore_errors=True)


def serve(settings: Settings) -> int:
    workers = settings.workers or default_workers()
    if workers == 1:
        server = uvicorn.Server(uvicorn_config(settings, 1))
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    # A container restarted in place has the pid of the last one: whatever that left is not ours.
    remove_metrics_dirs(os.getpid())
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    # Read by prometheus-client when a worker imports it: set before the first worker is spawned.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        config = uvicorn_config(settings, workers)
        supervisor = Workers(config, [config.bind_socket()], metrics_dir, settings.drain_s)
        supervisor.run()
        # A worker that could not start stops the supervisor (the next would fail the same way).
        return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main() -> int:
    try:
        settings = get_settings()
        settings.load_api_keys()
    except (SettingsError, NoApiKeys) as e:
        # One line and exit status 2 before anything listens, as for a bad command-line flag.
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    return serve(settings)
