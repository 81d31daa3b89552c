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

Closing a listening socket resets the connections the kernel completed that no accept() took yet, and
their clients may have sent a request by then: a request lost, not refused. So before the listeners close,
the kernel is told to complete no more (`refuse_new_connections`) and the loop accepts what it already
completed, for ACCEPT_QUEUE_S.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

import uvicorn

from .settings import Settings

log = logging.getLogger("server")

# After the drain period, how long connections still open are served (each answer closing its
# connection) with the listeners already closed, before uvicorn's own shutdown.
LISTENERS_CLOSED_S = 1.0
# How long the loop accepts the connections the kernel completed before it was told to complete no more.
ACCEPT_QUEUE_S = 0.2

# setsockopt(SOL_SOCKET, SO_ATTACH_FILTER) takes a classic BPF program (linux/filter.h); this one is a
# single instruction, BPF_RET|BPF_K with k = 0, "keep 0 bytes" of every packet: each is dropped.
SO_ATTACH_FILTER = 26  # asm-generic/socket.h
DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Have the kernel complete no new connection on a listening socket; those it completed stay for
    accept(). It ignores new SYNs: their clients send them again a second later, find the port closed and
    are refused before sending a request. On a socket other processes listen on too, this stops them as
    well. False, with nothing done, where socket filters are not available (other than Linux)."""
    if sys.platform != "linux":
        return False
    program = ctypes.create_string_buffer(DROP_EVERY_PACKET, len(DROP_EVERY_PACKET))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, with the native padding.
    fprog = struct.pack("HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program
    except OSError as e:
        log.warning("could not stop new connections before closing the listener: %s", e)
        return False
    return True


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
    supervisor = os.getppid()  # with several workers, the process that shares their listening socket

    def stop() -> None:
        # uvicorn waits for in-flight requests without a bound unless --timeout-graceful-shutdown is given.
        if server.config.timeout_graceful_shutdown is None:
            server.config.timeout_graceful_shutdown = round(longest_request_s(settings))
        log.info("drained; stopping", extra={"fields": {"in_flight_connections": len(server.server_state.connections)}})
        # uvicorn's shutdown closes the listeners and, in the same step, every connection between two
        # requests: a request a client sends on such a connection at that moment gets no answer. So the
        # listeners close first; connections still open then are answered (503, Connection: close, which
        # ends them) for LISTENERS_CLOSED_S before uvicorn's shutdown closes what is left.
        # With several workers the listening socket is one, shared: their supervisor stops its new
        # connections when the drain period ends (server/serve.py), since one worker may drain alone. A
        # supervisor that was killed cannot; then every worker drains (each got SIGTERM at its death).
        if server.config.workers == 1 or os.getppid() != supervisor:
            for listener in server.servers:
                for sock in listener.sockets:
                    refuse_new_connections(sock)  # type: ignore[arg-type]  # asyncio's TransportSocket
        loop.call_later(ACCEPT_QUEUE_S, close_listeners)

    def close_listeners() -> None:
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
