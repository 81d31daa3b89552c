"""The local stack: the embedded Triton server and the gateway in front of it, started and stopped together.

`python -m stack` runs them under a `Supervisor`: a process that exits unexpectedly is started again after
a back-off (`RestartPolicy`), and stopping is driven by `StopSignals`, whose handler takes no lock.
`local_stack` (make demo, make loadtest, the benchmarks) runs the same supervisor from a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, start_http_server

from .launcher import GatewayProcess, LaunchError, TritonServer, _ManagedProcess, free_port
from .settings import StackSettings, TritonSettings

log = logging.getLogger(__name__)


def repository_api_key(cache_dir: Path) -> str:
    """The local stack's key for Triton's restricted APIs (inference among them), made once and readable
    only by this user."""
    path = cache_dir / "repository-api-key"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def triton_api_key(settings: TritonSettings) -> str | None:
    """The key that a client calling the local stack's Triton directly sends: TRITON_REPOSITORY_API_KEY,
    else the one the stack made; None when there is neither."""
    if settings.repository_api_key:
        return settings.repository_api_key.get_secret_value()
    try:
        return (Path(settings.cache_dir) / "repository-api-key").read_text().strip() or None
    except OSError:
        return None


def stack_processes(
    triton_settings: TritonSettings, *, gateway_host: str = "127.0.0.1", gateway_port: int = 8080
) -> tuple[TritonServer, GatewayProcess]:
    """Triton on the repository, and the gateway pointed at its gRPC port; neither started yet."""
    (triton,), gateway = replica_processes(triton_settings, gateway_host=gateway_host, gateway_port=gateway_port)
    return triton, gateway


def replica_processes(
    triton_settings: TritonSettings, *, replicas: int = 1, gateway_host: str = "127.0.0.1", gateway_port: int = 8080
) -> tuple[list[TritonServer], GatewayProcess]:
    """`replicas` Triton servers on the repository, the first on the configured ports and the others on free
    ones, and the gateway routing over all of them (server/replicas.py); none started yet."""
    cache_dir = Path(triton_settings.cache_dir)
    key = triton_settings.repository_api_key
    host = triton_settings.host
    tritons = []
    for number in range(1, replicas + 1):
        first = number == 1
        triton = TritonServer(
            model_repository=Path(triton_settings.model_repository),
            host=host,
            http_port=triton_settings.http_port if first else free_port(host),
            grpc_port=triton_settings.grpc_port if first else free_port(host),
            metrics_port=triton_settings.metrics_port if first else free_port(host),
            model_control_mode=triton_settings.model_control_mode,
            repository_poll_s=triton_settings.repository_poll_s,
            cache_dir=cache_dir,
            log_path=(cache_dir / ("tritonserver.log" if first else f"tritonserver-{number}.log")).resolve(),
            repository_api_key=key.get_secret_value() if key else repository_api_key(cache_dir),
        )
        if not first:
            triton.name = f"tritonserver-{number}"  # its restarts are counted, and logged, apart
        tritons.append(triton)
    gateway = GatewayProcess(
        host=gateway_host,
        port=gateway_port,
        env={
            "GATEWAY_TRITON_PROTOCOL": "grpc",
            "GATEWAY_TRITON_GRPC_URL": ",".join(t.grpc_url for t in tritons),
            "GATEWAY_TRITON_HTTP_URL": tritons[0].http_url,
            "GATEWAY_TRITON_REPOSITORY_KEY": tritons[0].repository_api_key or "",
        },
        log_path=cache_dir / "gateway.log",
    )
    return tritons, gateway


@contextlib.contextmanager
def local_stack(
    triton_settings: TritonSettings,
    *,
    gateway_host: str = "127.0.0.1",
    gateway_port: int = 8080,
    policy: Callable[[], RestartPolicy] | None = None,
    restarts: RestartCounter | None = None,
) -> Iterator[tuple[TritonServer, GatewayProcess]]:
    """Triton, then the gateway, each ready, supervised as `python -m stack` supervises them (restarts with
    back-off, a dead Triton's leftovers removed, restarts counted) from a thread of its own while the
    caller works; on exit the gateway is stopped (drained) first, then Triton.

    LaunchError when the stack cannot start; GaveUp on exit when a process crashed too often meanwhile
    (and stayed down), unless the caller's own exception is on its way.
    """
    triton, gateway = stack_processes(triton_settings, gateway_host=gateway_host, gateway_port=gateway_port)
    stopping = ThreadStop()
    supervisor = Supervisor([triton, gateway], stopping, policy=policy or RestartPolicy, restarts=restarts)
    gave_up: list[GaveUp] = []

    def supervise() -> None:
        try:
            while not stopping.stop:
                supervisor.check()
                stopping.wait(POLL_S)
        except GaveUp as e:
            log.error("%s", e)
            gave_up.append(e)

    watcher = threading.Thread(target=supervise, name="local-stack-supervisor", daemon=True)
    try:
        supervisor.start()
        watcher.start()
        yield triton, gateway
    finally:
        stopping.set()
        if watcher.is_alive():
            watcher.join()
        supervisor.stop()
        supervisor.restarts.close()
    if gave_up:
        raise gave_up[0]


class RestartPolicy:
    """When a process that crashed is started again, if at all.

    Each crash waits `backoff_s` doubled for every other crash within the last `window_s`, at most
    `backoff_max_s` (1, 2, 4, 8 s...); the `max_crashes`-th crash within the window gets None: the process
    keeps failing, and restarting it again would only hide that. A process that stays up longer than the
    window starts again from `backoff_s`.
    """

    def __init__(
        self,
        *,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_crashes: int = 5,
        window_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.max_crashes, self.window_s = max_crashes, window_s
        self.clock = clock
        self._crashes: deque[float] = deque()

    @classmethod
    def from_settings(cls, settings: StackSettings, clock: Callable[[], float] = time.monotonic) -> RestartPolicy:
        return cls(
            backoff_s=settings.restart_backoff_s,
            backoff_max_s=settings.restart_backoff_max_s,
            max_crashes=settings.max_crashes,
            window_s=settings.restart_window_s,
            clock=clock,
        )

    @property
    def recent_crashes(self) -> int:
        self._forget_old(self.clock())
        return len(self._crashes)

    def _forget_old(self, now: float) -> None:
        while self._crashes and now - self._crashes[0] > self.window_s:
            self._crashes.popleft()

    def crashed(self) -> float | None:
        """Record a crash now: seconds to wait before the restart, or None to give up."""
        now = self.clock()
        self._crashes.append(now)
        self._forget_old(now)
        if len(self._crashes) >= self.max_crashes:
            return None
        return min(self.backoff_max_s, self.backoff_s * 2 ** (len(self._crashes) - 1))


class StopSignals:
    """SIGINT and SIGTERM, counted for a loop that waits on them.

    The handler only adds one to an int: a handler runs in the main thread between two bytecodes, which
    may be inside the very lock it would take. `threading.Event.set()` there deadlocked once, when the
    signal landed while the main thread held the event's condition lock in `Event.wait()`, and every
    later signal queued behind the same lock. `signal.set_wakeup_fd` writes a byte for each signal at C
    level, which ends a `wait` at once rather than at its timeout.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1

    def __enter__(self) -> StopSignals:
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()

    @property
    def stop(self) -> bool:
        return self.received > 0

    @property
    def force(self) -> bool:
        """A second signal: stop without waiting for anything."""
        return self.received > 1

    def wait(self, timeout_s: float) -> None:
        """Sleep `timeout_s`, or less if a signal comes."""
        select.select([self._reader], [], [], max(0.0, timeout_s))
        try:
            while self._reader.recv(512):
                pass
        except BlockingIOError:
            pass


class ThreadStop:
    """Says when a supervisor running in a thread stops: once the thread that owns the stack calls `set`.
    Never forced: signals stay with that thread (KeyboardInterrupt)."""

    force = False

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def stop(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout_s: float) -> None:
        self._event.wait(max(0.0, timeout_s))


class Stopper(Protocol):
    """When a supervisor stops (`stop`), when it stops without waiting (`force`), and the wait between checks."""

    @property
    def stop(self) -> bool: ...

    @property
    def force(self) -> bool: ...

    def wait(self, timeout_s: float) -> None: ...


class GaveUp(LaunchError):
    """A process crashed too often in too short a time to be started again."""


class RestartCounter:
    """stack_process_restarts_total{process=..., reason="crashed"|"exited"}, served on its own loopback port
    when the port is not 0. "exited": the process ended by itself with code 0, as a gateway does once it
    has drained after a SIGTERM sent to it alone; "crashed": anything else (a signal, a failure code, not
    ready in time)."""

    REASONS = ("crashed", "exited")

    def __init__(self, processes: Sequence[str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.counter = Counter(
            "stack_process_restarts",
            "Processes of the local stack started again after they exited unexpectedly",
            ["process", "reason"],
            registry=self.registry,
        )
        for name in processes:
            for reason in self.REASONS:
                self.counter.labels(name, reason)  # exported as 0 before the first restart
        self._server = None
        if port:
            try:
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                raise LaunchError(f"cannot serve the stack's metrics on {host}:{port}: {e}") from e
            log.info("restart counts on http://%s:%d/metrics", host, port)

    def inc(self, name: str, reason: str = "crashed") -> None:
        self.counter.labels(name, reason).inc()

    def value(self, name: str, reason: str | None = None) -> float:
        """Restarts of `name` for `reason`, or for any reason."""
        return sum(
            self.registry.get_sample_value("stack_process_restarts_total", {"process": name, "reason": r}) or 0.0
            for r in ((reason,) if reason else self.REASONS)
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited unexpectedly with code {code}"


@dataclass
class _Child:
    process: _ManagedProcess
    policy: RestartPolicy
    state: str = "stopped"  # starting, running, waiting (to restart)
    at: float = 0.0  # starting: when it must be ready by; waiting: when to start it again
    was_ready: bool = False  # ready at least once since the stack started
    restart_reason: str = "crashed"  # waiting: why it is started again


POLL_S = 0.5


class Supervisor:
    """Starts processes in order, each ready before the next, restarts any that exits unexpectedly, and
    stops them in the reverse order.

    `signals` says when to stop (and when to stop at once) and does the waiting between checks.
    """

    def __init__(
        self,
        processes: Sequence[_ManagedProcess],
        signals: Stopper,
        *,
        policy: Callable[[], RestartPolicy] = RestartPolicy,
        restarts: RestartCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = [_Child(process, policy()) for process in processes]
        self.signals = signals
        self.restarts = restarts or RestartCounter([p.name for p in processes])
        self.clock = clock

    def start(self) -> bool:
        """Start every process in order, each ready before the next; False when a signal came first.

        LaunchError when one exits with a failure code before it was ever ready, or is not ready in time:
        its setup is wrong (a port taken, a bad setting, a missing repository), and starting it again would
        fail the same way. One killed by a signal, or ending with code 0, is started again as in `check`.
        """
        for child in self.children:
            self._launch(child)
            while child.state != "running":
                if self.signals.stop:
                    return False
                self._step(child)
                if child.state != "running":
                    self.signals.wait(0.2)
        return True

    def _launch(self, child: _Child) -> None:
        child.process.launch()
        child.state, child.at = "starting", self.clock() + child.process.startup_timeout_s

    def check(self) -> None:
        """One round: notice processes that exited, and start again those whose back-off is over."""
        for child in self.children:
            self._step(child)

    def _step(self, child: _Child) -> None:
        process = child.process
        if child.state == "waiting":
            if self.clock() >= child.at:
                self.restarts.inc(process.name, child.restart_reason)
                log.info("starting %s again", process.name)
                try:
                    self._launch(child)
                except LaunchError as e:
                    self._crashed(child, f"could not be started again: {e}")
        elif not process.running():
            code = process.returncode
            if code == 0:
                self._exited(child)
            elif code is not None and code > 0 and not child.was_ready:
                process.stop(timeout_s=0)
                raise LaunchError(
                    f"{process.name} exited with code {code} before it was ever ready, so its setup is wrong "
                    f"and it is not started again; last lines of {process.log_path}:\n{process.log_tail()}"
                )
            else:
                self._crashed(child, _how_it_ended(code))
        elif child.state == "starting":
            if process.ready():
                child.state = "running"
                if child.was_ready:
                    log.info("%s is back (pid %s)", process.name, process.pid)
                child.was_ready = True
            elif self.clock() > child.at:
                if not child.was_ready:
                    raise LaunchError(
                        f"{process.name} was not ready within {process.startup_timeout_s:.0f} s of its first "
                        f"start; see {process.log_path}"
                    )
                self._crashed(child, f"was not ready within {process.startup_timeout_s:.0f} s")

    def _crashed(self, child: _Child, what: str) -> None:
        process = child.process
        process.stop(timeout_s=0)  # what is left of it: stub processes, shared memory, the log file
        delay = child.policy.crashed()
        if delay is None:
            raise GaveUp(
                f"{process.name} {what}: {child.policy.max_crashes} crashes within "
                f"{child.policy.window_s:.0f} s, so it is not started again; see {process.log_path}"
            )
        log.warning("%s %s; starting it again in %g s (see %s)", process.name, what, delay, process.log_path)
        child.state, child.at, child.restart_reason = "waiting", self.clock() + delay, "crashed"

    def _exited(self, child: _Child) -> None:
        # Code 0: the process stopped as asked (a SIGTERM sent to it alone, and a gateway drains first).
        # Not a crash: it is started again after the first back-off step and never makes the stack give up.
        process = child.process
        process.stop(timeout_s=0)
        delay = child.policy.backoff_s
        log.info("%s exited with code 0 (stopped from outside); starting it again in %g s", process.name, delay)
        child.state, child.at, child.restart_reason = "waiting", self.clock() + delay, "exited"

    def stop(self) -> None:
        """Stop every process, the last started first, each given its own stop timeout unless a second
        signal says to stop at once."""
        for child in reversed(self.children):
            child.process.stop(force=lambda: self.signals.force)
            child.state = "stopped"

    def run(self, on_ready: Callable[[], None] = lambda: None) -> int:
        """Start, supervise until a signal, stop every process: 0 after a signal, 1 when a process crashed
        too often; LaunchError when the stack could not start."""
        try:
            if self.start():
                on_ready()
                while not self.signals.stop:
                    self.check()
                    self.signals.wait(POLL_S)
        except GaveUp as e:
            log.error("%s", e)
            return 1
        finally:
            self.stop()
            self.restarts.close()
        log.info("stopped")
        return 0
