"""`python -m loadtests.chaos` (make chaos): faults injected into the local stack under steady load.

Publishes a small untrained classifier into a temporary repository, starts `python -m stack` on free
loopback ports, keeps a few closed-loop clients sending classify requests, and runs each fault in turn with
a quiet period around it. Every request's start, end and outcome is recorded: an HTTP status, "refused"
(the connection was refused: the request never reached a server) or "lost" (no answer: a reset, a
disconnect or a timeout after the request was sent). Writes loadtests/reports/<timestamp>/chaos.md and
chaos.png, and exits 1 when an invariant breaks:

- nothing is lost, in any scenario;
- inside a fault window, no 5xx other than 503 and 504;
- outside fault windows, nothing but 2xx;
- 429 only in the flood, refused connections only while the gateway process itself restarts, and no
  non-2xx at all while a version (good or broken) is published or while slow clients trickle bodies.

Scenarios that need two Triton replicas behind the gateway (replica-sigkill) run on a stack of their own,
started after the others.

A fault window lasts from the fault until the stack serves again: RECOVERED_RUN answers in a row that
started after the fault was over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from .targets import TargetRefused, require_loopback

log = logging.getLogger("loadtests.chaos")

MODEL = "chaos"
ROOT = Path(__file__).resolve().parents[1]
REPORTS = Path("loadtests/reports")
RECOVERED_RUN = 8  # answers in a row, all 2xx, that end a fault window
RECOVERY_TIMEOUT_S = 120.0  # a fault not recovered from by then breaks the run's invariants
READY_TIMEOUT_S = 300.0  # the stack's first start: Triton copies its backends and loads the model
# The gateway's limits, set low so that the faults reach them in seconds.
TRITON_TIMEOUT_S = 2.0
MAX_IN_FLIGHT = 4
BODY_TIMEOUT_S = 2.0
DRAIN_S = 1.0
OUTCOMES = ("2xx", "429", "503", "504", "other 5xx", "other", "refused", "lost")
COLORS = {
    "2xx": "tab:green",
    "429": "tab:orange",
    "503": "tab:red",
    "504": "tab:purple",
    "other 5xx": "black",
    "other": "tab:gray",
    "refused": "tab:brown",
    "lost": "magenta",
}


class ChaosError(RuntimeError):
    """The suite could not be run: the stack did not start, or a fault could not be injected."""


@dataclass(frozen=True)
class Request:
    """One request as a client saw it; times in seconds of time.monotonic()."""

    kind: str  # steady, flood or slow
    start: float
    end: float
    status: int | None  # None when refused or lost
    failure: str = ""  # "refused" or "lost"

    @property
    def outcome(self) -> str:
        if self.status is None:
            return self.failure
        if 200 <= self.status < 300:
            return "2xx"
        if self.status in (429, 503, 504):
            return str(self.status)
        return "other 5xx" if self.status >= 500 else "other"


@dataclass
class Window:
    """A fault window: from the fault's start until the stack served again."""

    scenario: str
    start: float
    end: float = 0.0


# --- the model ------------------------------------------------------------------------------------------------


def export_untrained(output: Path) -> Path:
    """A small untrained classifier for the digits dataset's 8x8 images, exported with the builder's own
    export (parity-checked against PyTorch): availability is measured here, not accuracy."""
    from builder.checkpoint import ModelMeta
    from builder.data import load_dataset, resolve_spec
    from builder.export import export_model, parity_batch
    from builder.models import create_model

    dataset = load_dataset("digits")
    spec = resolve_spec(dataset)
    meta = ModelMeta(
        arch="mobilenet_v3_small",
        num_classes=len(dataset.classes),
        in_channels=spec.channels,
        image_size=spec.image_size,
        classes=tuple(dataset.classes),
        preprocess=spec,
        config={"dataset": "digits", "val_fraction": 0.2, "seed": 0},
    )
    model = create_model(meta.arch, num_classes=meta.num_classes, in_channels=meta.in_channels, image_size=8)
    model.eval()
    export_model(model, meta, output, parity=parity_batch(meta, 4, dataset))
    return output


def publish_version(onnx_path: Path, repository: Path) -> int:
    """Publish `onnx_path` as the next version of the suite's model; returns its number."""
    from builder.publish import PublishSettings, publish

    return publish(onnx_path, repository, MODEL, settings=PublishSettings(instance_count=1)).version


def publish_broken(repository: Path) -> int:
    """A new version whose model file Triton cannot load: a copy of the latest with model.onnx garbled."""
    from builder.publish import versions

    model_dir = repository / MODEL
    latest = max(versions(model_dir))
    staging = model_dir / f".broken-{latest + 1}"
    shutil.copytree(model_dir / str(latest), staging)
    (staging / "model.onnx").write_bytes(b"this is not an ONNX model\n")
    staging.rename(model_dir / str(latest + 1))  # whole at once, as the builder publishes
    return latest + 1


def sample_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buffer, "PNG")
    return buffer.getvalue()


# --- the stack ------------------------------------------------------------------------------------------------


class ChaosStack:
    """`python -m stack` on free loopback ports with the gateway's limits set low, with `replicas` Triton
    servers behind its gateway; stopped with all it started by `close`, whatever state its processes are in
    (a stopped Triton is continued first)."""

    def __init__(self, repository: Path, work_dir: Path, host: str = "127.0.0.1", replicas: int = 1) -> None:
        from stack.launcher import _die_with_parent, free_port

        require_loopback(host)
        self.host = host
        self.work_dir = work_dir
        self.gateway_port = free_port(host)
        self.triton_http_port = free_port(host)
        self.log_path = work_dir / "stack.log"
        self.cache_dir = work_dir / "triton-cache"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "TRITON_HOST": host,
            "TRITON_HTTP_PORT": str(self.triton_http_port),
            "TRITON_GRPC_PORT": str(free_port(host)),
            "TRITON_METRICS_PORT": str(free_port(host)),
            "TRITON_CACHE_DIR": str(self.cache_dir),
            "TRITON_REPOSITORY_POLL_S": "1",
            "TRITON_MODEL_CONTROL_MODE": "poll",
            "GATEWAY_HOST": host,
            "GATEWAY_PORT": str(self.gateway_port),
            "GATEWAY_TRITON_TIMEOUT_S": str(TRITON_TIMEOUT_S),
            # One gateway process: the flood's 429 threshold is per worker, and the soak watches this
            # process's memory, descriptors and threads.
            "GATEWAY_WORKERS": "1",
            "GATEWAY_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
            "GATEWAY_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "GATEWAY_DRAIN_S": str(DRAIN_S),
            "GATEWAY_MODEL_INFO_TTL_S": "0.5",
            "STACK_METRICS_PORT": "0",
            "STACK_RESTART_BACKOFF_S": "0.5",
            "STACK_TRITON_REPLICAS": str(replicas),
        }
        for name in [n for n in env if n.startswith(("LOADTEST_", "GATEWAY_API_KEYS"))]:
            env.pop(name)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stack", "--repository", str(repository)],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # gone with this process even when it is killed
        )
        self.seen: set[int] = set()  # every descendant seen, for the clean-up

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise ChaosError(f"the stack exited with {self.process.returncode}:\n{self.log_tail()}")

    def child(self, name: str) -> int | None:
        """The pid of a live tritonserver or gateway process of the stack."""
        pids = self.children(name)
        return pids[0] if pids else None

    def children(self, name: str) -> list[int]:
        """The pids of the stack's live tritonserver (one per replica) or gateway processes."""
        from stack.launcher import is_gateway_command

        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                command = child.cmdline()
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            if (name == "tritonserver" and command and command[0].endswith("tritonserver")) or (
                name == "gateway" and is_gateway_command(command)
            ):
                self.seen.add(child.pid)
                pids.append(child.pid)
        return pids

    def ready(self) -> bool:
        self.alive()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def version_ready(self, version: int) -> bool:
        """Whether Triton serves `version` of the model."""
        from server.triton import REPOSITORY_KEY_HEADER
        from stack.supervisor import repository_api_key

        url = f"http://{self.host}:{self.triton_http_port}/v2/models/{MODEL}/versions/{version}/ready"
        try:
            headers = {REPOSITORY_KEY_HEADER: repository_api_key(self.cache_dir)}
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Stop the stack (drained, as `make serve` is stopped), then anything of it that outlived it."""
        from stack.launcher import remove_regions

        with contextlib.suppress(psutil.NoSuchProcess):
            for descendant in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.add(descendant.pid)
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.resume()  # a Triton stopped by a fault cannot stop by itself
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    for member in [*process.children(recursive=True), process]:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            member.kill()
            remove_regions(f"gateway-{pid}-")
        remove_regions(f"triton_python_backend_shm_region_{self.process.pid}_")
        self._log.close()


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise ChaosError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.2)


# --- the load -------------------------------------------------------------------------------------------------


class Load:
    """Closed-loop clients that record every request they make."""

    def __init__(self, url: str, image: bytes) -> None:
        self.url = url
        self.path = f"/v1/models/{MODEL}/classify"
        self.image = image
        self.requests: list[Request] = []
        self.stopping = asyncio.Event()

    async def _one(self, client: httpx.AsyncClient, kind: str) -> Request:
        start = time.monotonic()
        try:
            answer = await client.post(self.path, content=self.image, headers={"Content-Type": "image/png"})
            request = Request(kind, start, time.monotonic(), answer.status_code)
        except httpx.ConnectError:
            request = Request(kind, start, time.monotonic(), None, "refused")
        except httpx.HTTPError as e:
            log.warning("%s request lost: %r", kind, e)
            request = Request(kind, start, time.monotonic(), None, "lost")
        self.requests.append(request)
        return request

    async def client(self, kind: str, stop: asyncio.Event) -> None:
        # A read timeout well past the gateway's longest answer: hitting it means no answer came.
        timeout = httpx.Timeout(30.0, connect=5.0)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout) as client:
            while not stop.is_set():
                request = await self._one(client, kind)
                if request.status is None or request.status in (429, 503):
                    await asyncio.sleep(0.05)  # as a client honouring Retry-After would, only sooner

    async def _trickle(self, writer: asyncio.StreamWriter, head: bytes, byte_every_s: float) -> None:
        writer.write(head)
        for byte in self.image:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(byte_every_s)

    async def slow_client(self, stop: asyncio.Event, byte_every_s: float = 0.25) -> None:
        """Sends the head of a request and then its body a byte at a time, slower than the gateway reads."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(self.image)}\r\nConnection: close\r\n\r\n"
        ).encode()
        while not stop.is_set():
            start = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                self.requests.append(Request("slow", start, time.monotonic(), None, "refused"))
                await asyncio.sleep(0.05)
                continue
            sender = asyncio.create_task(self._trickle(writer, head, byte_every_s))
            status: int | None = None
            try:
                # The gateway answers once its body deadline passes, while the body is still coming.
                line = await asyncio.wait_for(reader.readline(), timeout=BODY_TIMEOUT_S + 30)
                status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
            except (OSError, TimeoutError, ValueError, IndexError):
                status = None
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self.requests.append(Request("slow", start, time.monotonic(), status, "" if status else "lost"))

    def recovered_since(self, since: float) -> bool:
        """The last RECOVERED_RUN steady answers all started after `since` and were 2xx."""
        recent = [r for r in self.requests if r.kind == "steady" and r.start >= since][-RECOVERED_RUN:]
        return len(recent) == RECOVERED_RUN and all(r.outcome == "2xx" for r in recent)


# --- the scenarios --------------------------------------------------------------------------------------------


@dataclass
class Context:
    stack: ChaosStack
    load: Load
    onnx_path: Path
    repository: Path
    duration_s: float


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    inject: Callable[[Context], Awaitable[None]]  # returns when the fault itself is over
    allowed: frozenset[str]  # outcomes allowed inside the window besides 2xx
    replicas: int = 1  # Triton servers behind the gateway of the stack it runs on


async def _in_thread(function: Callable, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _pid(ctx: Context, name: str) -> int:
    pid = ctx.stack.child(name)
    if pid is None:
        raise ChaosError(f"the stack has no {name} process to fault:\n{ctx.stack.log_tail()}")
    return pid


async def triton_sigkill(ctx: Context) -> None:
    os.kill(_pid(ctx, "tritonserver"), signal.SIGKILL)


async def triton_sigstop(ctx: Context) -> None:
    pid = _pid(ctx, "tritonserver")
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(max(ctx.duration_s, TRITON_TIMEOUT_S + 1))
    finally:
        os.kill(pid, signal.SIGCONT)


async def gateway_sigterm(ctx: Context) -> None:
    pid = _pid(ctx, "gateway")
    os.kill(pid, signal.SIGTERM)
    while ctx.stack.child("gateway") in (None, pid):  # the drained gateway exits; the supervisor starts another
        ctx.stack.alive()
        await asyncio.sleep(0.1)


async def replica_sigkill(ctx: Context) -> None:
    # One of the two replicas, killed mid-request: the gateway retries what the dead one held on the other.
    # The fault lasts its duration and until the supervisor has started the replica again.
    pid = _pid(ctx, "tritonserver")
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(ctx.duration_s)
    while len(pids := ctx.stack.children("tritonserver")) < 2 or pid in pids:
        ctx.stack.alive()
        await asyncio.sleep(0.1)


async def publish_good(ctx: Context) -> None:
    version = await _in_thread(publish_version, ctx.onnx_path, ctx.repository)
    while not await _in_thread(ctx.stack.version_ready, version):
        await asyncio.sleep(0.2)
    await asyncio.sleep(ctx.duration_s)  # the old version unloads while the load goes on


async def publish_bad(ctx: Context) -> None:
    version = await _in_thread(publish_broken, ctx.repository)
    await asyncio.sleep(max(ctx.duration_s, 3.0))  # Triton's poll (1 s) tries it and fails
    if await _in_thread(ctx.stack.version_ready, version):
        raise ChaosError(f"Triton serves the broken version {version}: the fault was not injected")
    shutil.rmtree(ctx.repository / MODEL / str(version))
    await asyncio.sleep(2.0)  # the next poll forgets it


async def flood(ctx: Context) -> None:
    stop = asyncio.Event()
    clients = [asyncio.create_task(ctx.load.client("flood", stop)) for _ in range(MAX_IN_FLIGHT * 4)]
    await asyncio.sleep(ctx.duration_s)
    stop.set()
    await asyncio.gather(*clients)


async def slow_bodies(ctx: Context) -> None:
    stop = asyncio.Event()
    clients = [asyncio.create_task(ctx.load.slow_client(stop)) for _ in range(3)]
    await asyncio.sleep(max(ctx.duration_s, BODY_TIMEOUT_S + 1))
    stop.set()
    await asyncio.gather(*clients)


NONE: frozenset[str] = frozenset()
SCENARIOS = {
    s.name: s
    for s in (
        Scenario("triton-sigkill", "tritonserver killed (SIGKILL)", triton_sigkill, frozenset({"503", "504"})),
        Scenario(
            "triton-sigstop",
            f"tritonserver stopped (SIGSTOP) past the gateway's {TRITON_TIMEOUT_S:g} s Triton timeout, then SIGCONT",
            triton_sigstop,
            frozenset({"503", "504"}),
        ),
        Scenario(
            "gateway-drain",
            "gateway SIGTERM: drained, exits, started again by the supervisor",
            gateway_sigterm,
            frozenset({"503", "504", "refused"}),
        ),
        Scenario("publish", "a new version published under load", publish_good, NONE),
        Scenario("publish-broken", "a version Triton cannot load published, then removed", publish_bad, NONE),
        Scenario(
            "flood", f"{MAX_IN_FLIGHT * 4} more clients, above max_in_flight={MAX_IN_FLIGHT}", flood, frozenset({"429"})
        ),
        Scenario("slow-bodies", "3 clients trickling bodies a byte per 0.25 s", slow_bodies, frozenset({"other"})),
        # Last: it runs on a stack of its own, with two Triton replicas behind the gateway.
        Scenario(
            "replica-sigkill",
            "one of two Triton replicas behind the gateway killed (SIGKILL)",
            replica_sigkill,
            frozenset({"503", "504"}),
            replicas=2,
        ),
    )
}


# --- running and judging --------------------------------------------------------------------------------------


@dataclass
class Result:
    requests: list[Request]
    windows: list[Window]
    origin: float  # time.monotonic() when the load started
    violations: list[str] = field(default_factory=list)


async def _drive(
    ctx: Context, scenarios: Sequence[Scenario], quiet_s: float, clients: int, recovery_timeout_s: float
) -> Result:
    stop = asyncio.Event()
    unrecovered: list[str] = []
    origin = time.monotonic()
    steady = [asyncio.create_task(ctx.load.client("steady", stop)) for _ in range(clients)]
    windows: list[Window] = []
    try:
        await asyncio.sleep(quiet_s)
        for scenario in scenarios:
            log.info("fault: %s", scenario.description)
            window = Window(scenario.name, time.monotonic())
            windows.append(window)
            await scenario.inject(ctx)
            over = time.monotonic()
            deadline = over + recovery_timeout_s
            exited = None
            while not ctx.load.recovered_since(over) and time.monotonic() < deadline:
                if (exited := ctx.stack.process.poll()) is not None:
                    break
                await asyncio.sleep(0.1)
            window.end = time.monotonic()
            if exited is not None:
                unrecovered.append(f"{scenario.name}: the stack exited with {exited}:\n{ctx.stack.log_tail(8)}")
                break
            if not ctx.load.recovered_since(over):
                unrecovered.append(f"{scenario.name}: not serving again {recovery_timeout_s:g} s after the fault")
                break  # the later faults would measure this one
            log.info("recovered from %s in %.1f s", scenario.name, window.end - window.start)
            await asyncio.sleep(quiet_s)
    finally:
        stop.set()
        await asyncio.gather(*steady, return_exceptions=True)
    return Result(list(ctx.load.requests), windows, origin, unrecovered)


def _overlaps(request: Request, window: Window) -> bool:
    return request.start <= window.end and request.end >= window.start


def window_requests(result: Result, window: Window) -> list[Request]:
    return [r for r in result.requests if _overlaps(r, window)]


def time_to_recover(requests: Sequence[Request], window: Window) -> float | None:
    """From the fault to the first 2xx answer after its last non-2xx one; None when there was none."""
    steady = sorted((r for r in requests if r.kind == "steady"), key=lambda r: r.end)
    failed = [r.end for r in steady if r.outcome != "2xx"]
    if not failed:
        return None
    first_ok = next((r.end for r in steady if r.outcome == "2xx" and r.end > failed[-1]), None)
    return None if first_ok is None else first_ok - window.start


def check(result: Result) -> list[str]:
    """The invariants; one line for each that broke."""
    violations = list(result.violations)  # faults not recovered from
    for window in result.windows:
        scenario = SCENARIOS[window.scenario]
        requests = window_requests(result, window)
        counts = Counter(r.outcome for r in requests)
        for outcome, count in counts.items():
            if outcome == "lost":
                violations.append(f"{window.scenario}: {count} request(s) lost")
            elif outcome != "2xx" and outcome not in scenario.allowed:
                # "other" and "other 5xx" name the statuses too: which one it was is the first question.
                statuses = Counter(r.status for r in requests if r.outcome == outcome)
                named = ", ".join(f"{status} x{n}" for status, n in sorted(statuses.items(), key=str))
                what = f"{outcome} ({named})" if outcome.startswith("other") else outcome
                violations.append(f"{window.scenario}: {count} answer(s) {what} during the fault")
    outside = Counter(
        r.outcome for r in result.requests if r.outcome != "2xx" and not any(_overlaps(r, w) for w in result.windows)
    )
    for outcome, count in outside.items():
        violations.append(f"outside the fault windows: {count} request(s) {outcome}")
    return violations


def run_scenarios(
    names: Sequence[str],
    *,
    work_dir: Path,
    duration_s: float = 6.0,
    quiet_s: float = 3.0,
    clients: int = 4,
    host: str = "127.0.0.1",
    onnx_path: Path | None = None,
    recovery_timeout_s: float = RECOVERY_TIMEOUT_S,
) -> Result:
    """Publish the model, start a stack for each run of scenarios that need as many Triton replicas, run
    the named scenarios under load, stop everything."""
    if not names:
        raise ChaosError(f"no scenario given; choose from {', '.join(SCENARIOS)}")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ChaosError(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    require_loopback(host)
    repository = work_dir / "model_repository"
    repository.mkdir(parents=True, exist_ok=True)
    onnx_path = onnx_path or export_untrained(work_dir / "model.onnx")
    publish_version(onnx_path, repository)
    result: Result | None = None
    # Scenarios in a row that need the same number of Triton replicas share one stack.
    for replicas, group in itertools.groupby(names, key=lambda n: SCENARIOS[n].replicas):
        stack = ChaosStack(repository, work_dir, host, replicas=replicas)
        try:
            wait_until(stack.ready, READY_TIMEOUT_S, f"the start of the stack with {replicas} Triton replica(s)")
            load = Load(stack.url, sample_image())
            ctx = Context(stack, load, onnx_path, repository, duration_s)
            part = asyncio.run(_drive(ctx, [SCENARIOS[n] for n in group], quiet_s, clients, recovery_timeout_s))
        finally:
            stack.close()
        if result is None:
            result = part
        else:
            result.requests += part.requests
            result.windows += part.windows
            result.violations += part.violations
        if part.violations:
            break  # a fault not recovered from: the later ones would measure it
    assert result is not None  # names is not empty
    result.violations = check(result)
    return result


# --- the report -----------------------------------------------------------------------------------------------


def render_table(result: Result) -> str:
    head = (
        "| scenario | window s | sent | 2xx | 429 | 503 | 504 | other 5xx | other | refused | lost "
        "| first non-2xx s | recovered s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for window in result.windows:
        requests = window_requests(result, window)
        counts = Counter(r.outcome for r in requests)
        recover = time_to_recover(requests, window)
        failures = [r.end for r in requests if r.kind == "steady" and r.outcome != "2xx" and r.end >= window.start]
        cells = [
            window.scenario,
            f"{window.end - window.start:.1f}",
            str(len(requests)),
            *(str(counts.get(o, 0)) for o in OUTCOMES),
            f"{min(failures) - window.start:.2f}" if failures else "-",
            "-" if recover is None else f"{recover:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    outside = [r for r in result.requests if not any(_overlaps(r, w) for w in result.windows)]
    counts = Counter(r.outcome for r in outside)
    lines.append(
        "| (outside the windows) | | "
        + str(len(outside))
        + " | "
        + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES)
        + " | | |"
    )
    return "\n".join(lines)


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    end = max((r.end for r in result.requests), default=result.origin) - result.origin
    bins = np.arange(0.0, end + 1.0, 0.5)
    figure, axes = plt.subplots(figsize=(12, 4.5))
    bottom = np.zeros(len(bins) - 1)
    for outcome in OUTCOMES:
        times = [r.end - result.origin for r in result.requests if r.outcome == outcome]
        if not times:
            continue
        counts, _ = np.histogram(times, bins)
        axes.bar(
            bins[:-1], counts, width=0.5, bottom=bottom, align="edge", color=COLORS[outcome], label=outcome, zorder=2
        )
        bottom += counts
    top = max(bottom.max(), 1)
    for window in result.windows:
        axes.axvspan(window.start - result.origin, window.end - result.origin, color="0.88", zorder=0)
        axes.text(window.start - result.origin, top * 1.02, window.scenario, fontsize=8, rotation=20)
    axes.set_ylim(0, top * 1.25)
    axes.set_xlabel("seconds since the load started (answers by the time they ended)")
    axes.set_ylabel("requests per 0.5 s")
    axes.set_title("status codes over time; fault windows shaded")
    axes.legend(loc="upper right", fontsize=8, ncol=4)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(result: Result, folder: Path, *, command: str, duration_s: float, quiet_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot(result, folder / "chaos.png")
    described = "\n".join(f"- `{w.scenario}`: {SCENARIOS[w.scenario].description}" for w in result.windows)
    verdict = (
        "All invariants held."
        if not result.violations
        else "Invariants broken:\n\n" + "\n".join(f"- {v}" for v in result.violations)
    )
    text = f"""# Chaos run

`{command}`: per-scenario duration {duration_s:g} s, quiet periods {quiet_s:g} s; the gateway with
triton_timeout_s={TRITON_TIMEOUT_S:g}, max_in_flight={MAX_IN_FLIGHT}, body_timeout_s={BODY_TIMEOUT_S:g},
drain_s={DRAIN_S:g}.

{described}

A window runs from the fault until {RECOVERED_RUN} answers in a row were 2xx; a request counts in a window
when its lifetime overlaps it. "other": a status outside 2xx/429/5xx (408 for slow bodies); "refused": the
connection was refused (never reached a server); "lost": no answer after the request was sent. First
non-2xx: seconds from the fault to the first steady client's failed answer; recovered: seconds from the
fault to the first 2xx after its last non-2xx.

{render_table(result)}

{verdict}

![status codes over time](chaos.png)
"""
    path = folder / "chaos.md"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds each fault lasts (default 6)")
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds of plain load around faults (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="steady closed-loop clients (default 4)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, in order (default: {','.join(SCENARIOS)})"
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address the stack listens on")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of reports (default loadtests/reports)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if not 0 < args.duration <= 120 or not 0 <= args.quiet <= 60 or not 1 <= args.clients <= 32:
        print("chaos: error: --duration must be in (0, 120], --quiet in [0, 60], --clients in [1, 32]", file=sys.stderr)
        return 2
    folder = args.out / dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    # SIGTERM as Ctrl-C: either unwinds through run_scenarios, which stops the stack and all it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _work_dir() as work_dir:
            result = run_scenarios(
                names,
                work_dir=work_dir,
                duration_s=args.duration,
                quiet_s=args.quiet,
                clients=args.clients,
                host=args.host,
            )
    except (ChaosError, TargetRefused) as e:
        print(f"chaos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    command = "python -m loadtests.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(result, folder, command=command.strip(), duration_s=args.duration, quiet_s=args.quiet)
    print(render_table(result))
    print(f"report: {report}")
    for violation in result.violations:
        print(f"chaos: invariant broken: {violation}", file=sys.stderr)
    return 1 if result.violations else 0


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="chaos-") as folder:
        yield Path(folder)


if __name__ == "__main__":
    sys.exit(main())
