"""Graceful shutdown: on SIGTERM the gateway drains before uvicorn stops it.

uvicorn's Server takes SIGINT and SIGTERM for itself (`signal.signal(sig, server.handle_exit)` around
its serve loop) and starts its shutdown at once: listeners closed, in-flight requests finished, the process
gone. A load balancer or Kubernetes Service that still sends traffic then gets refused connections. Under
uvicorn, the gateway takes SIGTERM over once it has started: the signal only schedules `begin` on the
event loop (asyncio's signal handling: the C-level handler writes to a wake-up pipe, no Python code that
could take a lock runs in the handler), and `begin` marks the gateway as draining. For `drain_s` seconds
/readyz answers 503 and new inference requests 503 with Retry-After; requests already in flight go on.
Every answer given while draining carries `Connection: close` (server/app.py), so a client's next request
opens a new connection: after the drain period the listeners close, and such a request is refused before it
is sent, never sent and then cut off. Then uvicorn is told to stop as it would have been (`should_exit`),
which finishes in-flight requests and exits 0. SIGINT (Ctrl+C) is left to uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable

import uvicorn

from .settings import Settings

log = logging.getLogger("server")

# After the drain period, how long connections still open are served (each answer closing its
# connection) with the listeners already closed, before uvicorn's own shutdown.
LISTENERS_CLOSED_S = 1.0


class Drain:
    """Whether the gateway is shutting down: set once, by SIGTERM, never cleared."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None


def longest_request_s(settings: Settings) -> float:
    """The longest an accepted inference request can take: its body, the preprocessing threads' queue, a
    model-config call and the inference, tried on a second replica when the first is unreachable (each
    Triton call bounded by triton_timeout_s)."""
    return settings.body_timeout_s + settings.preprocess_wait_s + 3 * settings.triton_timeout_s


def drain_on_sigterm(drain: Drain, settings: Settings) -> Callable[[], None] | None:
    """Takes SIGTERM over from the uvicorn server that runs this app; returns how to hand it back. None
    (nothing done) when the app does not run under uvicorn's server in the main thread, as in tests that
    serve it in-process."""
    previous = signal.getsignal(signal.SIGTERM)
    server = getattr(previous, "__self__", None)
    if not isinstance(server, uvicorn.Server) or threading.current_thread() is not threading.main_thread():
        return None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        # uvicorn waits for in-flight requests without a bound unless --timeout-graceful-shutdown is given.
        if server.config.timeout_graceful_shutdown is None:
            server.config.timeout_graceful_shutdown = round(longest_request_s(settings))
        log.info("drained; stopping", extra={"fields": {"in_flight_connections": len(server.server_state.connections)}})
        # uvicorn's shutdown closes the listeners and, in the same step, every connection between two
        # requests: a request a client sends on such a connection at that moment gets no answer. So the
        # listeners close first; connections still open then are answered (503, Connection: close, which
        # ends them) for LISTENERS_CLOSED_S before uvicorn's shutdown closes what is left.
        for listener in server.servers:
            listener.close()
        loop.call_later(LISTENERS_CLOSED_S, exit_uvicorn)

    def exit_uvicorn() -> None:
        server.should_exit = True

    def begin() -> None:
        if drain.active or server.should_exit:
            return  # a second SIGTERM changes nothing
        drain.since = time.monotonic()
        log.info("SIGTERM: draining", extra={"fields": {"drain_s": settings.drain_s}})
        loop.call_later(settings.drain_s, stop)

    loop.add_signal_handler(signal.SIGTERM, begin)

    def hand_back() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)

    return hand_back
