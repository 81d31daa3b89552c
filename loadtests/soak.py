"""`python -m loadtests.soak` (make soak): a long run of mixed requests, some of them bad, against the local
stack, watching the gateway process for leaks.

Starts `python -m stack` on free loopback ports with a small untrained model (as `make chaos` does), then
runs closed-loop clients through a warm-up and the soak proper: small and large images as raw bodies,
several at once as JSON and multipart, KServe v2 tensors, fresh connections, and bad input (random bytes,
truncated and oversized images, broken JSON, wrong content types, unknown models, out-of-range queries).
Every answer must carry the status its kind expects. The gateway process's RSS, open file descriptors and
threads (psutil) and its shared-memory free slots (/metrics) are sampled all along, and measured at rest,
with no client connected, after the warm-up and after the soak: file descriptors, threads and free slots
must be where they were, and RSS within --max-rss-growth of it. Writes loadtests/reports/<timestamp>/soak.md,
soak-samples.csv and soak.png; exits 1 when an invariant breaks, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import datetime as dt
import io
import json
import logging
import random
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from .chaos import MAX_IN_FLIGHT, MODEL, READY_TIMEOUT_S, ChaosError, ChaosStack, export_untrained, publish_version
from .chaos import wait_until as _wait_until
from .targets import TargetRefused, require_loopback

log = logging.getLogger("loadtests.soak")

REPORTS = Path("loadtests/reports")
MAX_REQUESTS = 200_000  # the bound on one run's count; --max-seconds bounds its time
SETTLE_TIMEOUT_S = 30.0  # for the gateway's descriptors to stop changing once the clients are gone
SETTLE_STEADY_READS = 5  # equal readings in a row, SETTLE_POLL_S apart, that count as settled
SETTLE_POLL_S = 0.2
PROGRESS_EVERY_S = 30.0  # a log line of the latest sample


# --- the requests ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: what is sent and the statuses it may be answered with."""

    name: str
    weight: int
    method: str
    path: str
    expected: frozenset[int]
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    bad: bool = False


def _encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed 8-bit RGB PNG (CRCs right) that declares `width` x `height` and holds one row of pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes(1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def request_mix(model_input: dict, rng: random.Random) -> list[Kind]:
    """The kinds of request, weighted: about four in five good ones, of several sizes and framings."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(1 << 30))
    small = _encoded(Image.new("L", (8, 8), 90), "PNG")
    photo = _encoded(Image.fromarray(pixels.integers(0, 256, (480, 640, 3), dtype=np.uint8)), "JPEG", quality=85)
    # A large image (4.2 megapixels, past the gateway's large-image size): its decode holds the decode budget,
    # is reduced before it is resized, and hands memory back afterwards. A gradient: small to send.
    ramp = np.linspace(0, 255, 2100, dtype=np.uint8)
    large = _encoded(Image.fromarray(np.stack([np.tile(ramp, (2000, 1))] * 3, axis=-1)), "PNG", compress_level=1)
    webp = _encoded(Image.fromarray(pixels.integers(0, 256, (96, 128, 3), dtype=np.uint8)), "WEBP")
    gif = _encoded(Image.new("P", (40, 30), 3), "GIF")
    classify = f"/v1/models/{MODEL}/classify"
    json_batch = json.dumps({"images": [base64.b64encode(data).decode() for data in (small, webp, gif, small)]})
    boundary = "soakboundary"
    multipart = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}"\r\n'.encode()
            + b"Content-Type: application/octet-stream\r\n\r\n"
            + data
            + b"\r\n"
            for i, data in enumerate((small, photo, webp))
        )
        + f"--{boundary}--\r\n".encode()
    )
    values = 1
    for dim in model_input["shape"][1:]:
        values *= int(dim)
    tensor = {"name": model_input["name"], "datatype": model_input["datatype"], "shape": [1, *model_input["shape"][1:]]}
    kserve = json.dumps({"inputs": [{**tensor, "data": [0.5] * values}]}).encode()
    kserve_short = json.dumps({"inputs": [{**tensor, "data": [0.5] * (values // 2)}]}).encode()
    ok = frozenset({200})
    busy = frozenset({200, 429})  # a large decode may find the decode budget taken, and is told to retry
    image_type = {"Content-Type": "image/png"}
    json_type = {"Content-Type": "application/json"}
    return [
        Kind("png-8x8", 30, "POST", classify, ok, small, image_type),
        Kind("jpeg-640x480", 12, "POST", classify, ok, photo, {"Content-Type": "image/jpeg"}),
        Kind("webp-128x96", 6, "POST", classify, ok, webp, {"Content-Type": "image/webp"}),
        Kind("png-4.2mp", 1, "POST", classify, busy, large, image_type),
        Kind("json-4-images", 8, "POST", classify, ok, json_batch.encode(), json_type, {"top_k": "3"}),
        Kind(
            "multipart-3-images",
            6,
            "POST",
            classify,
            ok,
            multipart,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        ),
        Kind("kserve-tensor", 8, "POST", f"/v2/models/{MODEL}/infer", ok, kserve, json_type),
        Kind("new-connection", 4, "POST", classify, ok, small, {**image_type, "Connection": "close"}),
        Kind("random-bytes", 4, "POST", classify, frozenset({400}), rng.randbytes(512), image_type, bad=True),
        Kind(
            "truncated-jpeg",
            3,
            "POST",
            classify,
            frozenset({400}),
            photo[: len(photo) // 2],
            {"Content-Type": "image/jpeg"},
            bad=True,
        ),
        Kind(
            "png-60000x60000-header",
            3,
            "POST",
            classify,
            frozenset({413}),
            _png_declaring(60000, 60000),
            image_type,
            bad=True,
        ),
        Kind("broken-json", 3, "POST", classify, frozenset({400}), b'{"images": ["', json_type, bad=True),
        Kind("text-plain", 2, "POST", classify, frozenset({415}), b"hello", {"Content-Type": "text/plain"}, bad=True),
        Kind(
            "unknown-model",
            2,
            "POST",
            "/v1/models/no-such-model/classify",
            frozenset({404}),
            small,
            image_type,
            bad=True,
        ),
        Kind("top-k-0", 2, "POST", classify, frozenset({422}), small, image_type, {"top_k": "0"}, bad=True),
        Kind(
            "kserve-short-data",
            2,
            "POST",
            f"/v2/models/{MODEL}/infer",
            frozenset({400}),
            kserve_short,
            json_type,
            bad=True,
        ),
    ]


# --- sampling the gateway -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    phase: str  # warm-up, soak, or "at rest" after either
    requests: int  # answered so far, both phases
    rss_bytes: int
    fds: int
    threads: int
    free_slots: float | None  # the gateway's shared-memory free slots; None when /metrics did not say
    # Of `fds`, the KServe pass-through's idle keep-alive connections to Triton's HTTP port: its pool keeps
    # as many as requests overlapped (up to httpx's limit), so at rest they count requests, not leaks.
    pooled: int = 0

    @property
    def own_fds(self) -> int:
        """Open file descriptors other than the pass-through's pooled connections."""
        return self.fds - self.pooled


def free_slots(client: httpx.Client) -> float | None:
    for line in client.get("/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name == "gateway_shared_memory_free_slots":
            return float(value)
    return None


class Gateway:
    """The gateway process of the stack, measured: the same pid all along, or the run is void."""

    def __init__(self, stack: ChaosStack) -> None:
        pid = stack.child("gateway")
        if pid is None:
            raise ChaosError("the stack has no gateway process")
        self.stack, self.pid = stack, pid
        self.process = psutil.Process(pid)
        self.metrics = httpx.Client(base_url=stack.url)
        self.origin = time.monotonic()

    def sample(self, phase: str, requests: int) -> Sample:
        if self.stack.child("gateway") != self.pid:
            raise ChaosError(f"the gateway process {self.pid} was replaced during the run:\n{self.stack.log_tail()}")
        with self.process.oneshot():
            rss, fds, threads = self.process.memory_info().rss, self.process.num_fds(), self.process.num_threads()
            pooled = sum(
                1
                for c in self.process.net_connections(kind="tcp")
                if c.raddr and c.raddr.port == self.stack.triton_http_port and c.status == psutil.CONN_ESTABLISHED
            )
        slots = free_slots(self.metrics)
        return Sample(time.monotonic() - self.origin, phase, requests, rss, fds, threads, slots, pooled)

    def at_rest(self, phase: str, requests: int) -> Sample:
        """A sample once no client is connected and the descriptors have stopped changing."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        readings: list[tuple[int, int]] = []
        while len(readings) < SETTLE_STEADY_READS or len(set(readings[-SETTLE_STEADY_READS:])) > 1:
            if time.monotonic() > deadline:
                break  # measured as it is: a count that never settles shows up as a change
            readings.append((self.process.num_fds(), self.process.num_threads()))
            time.sleep(SETTLE_POLL_S)
        return self.sample(phase, requests)

    def close(self) -> None:
        self.metrics.close()


# --- the load -------------------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Answers by kind and status; "lost" for a request that got none."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    answered: int = 0

    def record(self, kind: Kind, outcome: str) -> None:
        self.counts[kind.name, outcome] += 1
        self.answered += 1

    def unexpected(self, kinds: Sequence[Kind]) -> list[str]:
        by_name = {kind.name: kind for kind in kinds}
        return [
            f"{name}: {count} {'got no answer' if outcome == 'lost' else f'answered {outcome}'} "
            f"(expected {'/'.join(map(str, sorted(by_name[name].expected)))})"
            for (name, outcome), count in sorted(self.counts.items())
            if not (outcome.isdigit() and int(outcome) in by_name[name].expected)
        ]


async def _client(url: str, kinds: Sequence[Kind], rng: random.Random, quota: list[int], outcomes: Outcomes) -> None:
    weights = [kind.weight for kind in kinds]
    timeout = httpx.Timeout(60.0, connect=10.0)  # far past any answer: hitting it means none came
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while quota[0] > 0:
            quota[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            try:
                answer = await client.request(
                    kind.method, kind.path, content=kind.content, headers=kind.headers, params=kind.params
                )
                outcomes.record(kind, str(answer.status_code))
            except httpx.HTTPError as e:
                log.warning("%s: no answer: %r", kind.name, e)
                outcomes.record(kind, "lost")


async def _phase(
    gateway: Gateway,
    name: str,
    count: int,
    kinds: Sequence[Kind],
    clients: int,
    rng: random.Random,
    outcomes: Outcomes,
    samples: list[Sample],
    sample_every_s: float,
    deadline: float,
) -> None:
    quota = [count]
    tasks = [
        asyncio.create_task(_client(gateway.stack.url, kinds, random.Random(rng.random()), quota, outcomes))
        for _ in range(clients)
    ]
    logged = time.monotonic()
    try:
        while not all(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=sample_every_s)
            samples.append(sample := await asyncio.to_thread(gateway.sample, name, outcomes.answered))
            if time.monotonic() >= logged + PROGRESS_EVERY_S:
                logged = time.monotonic()
                log.info(
                    "%s: %d answered; gateway RSS %.1f MiB, %d fds, %d threads, %s free slots",
                    name,
                    sample.requests,
                    sample.rss_bytes / 2**20,
                    sample.fds,
                    sample.threads,
                    sample.free_slots,
                )
            if time.monotonic() > deadline:
                quota[0] = 0  # the time bound: the clients stop after the request they are in
    finally:
        quota[0] = 0
        await asyncio.gather(*tasks)


@dataclass
class SoakResult:
    kinds: list[Kind]
    outcomes: Outcomes
    samples: list[Sample]
    baseline: Sample  # at rest after the warm-up
    end: Sample  # at rest after the soak
    requested: int  # the soak's count (warm-up not included)
    warmup: int
    clients: int
    seconds: float
    violations: list[str] = field(default_factory=list)

    @property
    def soaked(self) -> int:
        """Requests answered (or lost) in the soak itself, after the warm-up."""
        return self.end.requests - self.baseline.requests

    @property
    def rss_growth(self) -> float:
        return (self.end.rss_bytes - self.baseline.rss_bytes) / self.baseline.rss_bytes


def check(result: SoakResult, max_rss_growth: float) -> list[str]:
    """The invariants; one line for each that broke."""
    violations = [f"unexpected answers: {line}" for line in result.outcomes.unexpected(result.kinds)]
    if result.soaked < result.requested:
        violations.append(f"only {result.soaked} of {result.requested} requests within the time limit")
    base, end = result.baseline, result.end
    if end.own_fds != base.own_fds:
        violations.append(f"open file descriptors at rest (less pooled ones) went from {base.own_fds} to {end.own_fds}")
    if end.pooled > result.clients:
        violations.append(f"{end.pooled} pooled connections to Triton at rest, more than the {result.clients} clients")
    if end.threads != base.threads:
        violations.append(f"threads at rest went from {base.threads} to {end.threads}")
    if end.free_slots != base.free_slots:
        violations.append(f"shared-memory free slots at rest went from {base.free_slots} to {end.free_slots}")
    if result.rss_growth > max_rss_growth:
        violations.append(
            f"RSS grew {result.rss_growth:.1%} after the warm-up ({base.rss_bytes / 2**20:.1f} -> "
            f"{end.rss_bytes / 2**20:.1f} MiB), more than {max_rss_growth:.0%}"
        )
    return violations


def run_soak(
    *,
    work_dir: Path,
    requests: int,
    warmup: int,
    clients: int = MAX_IN_FLIGHT,
    seed: int = 0,
    sample_every_s: float = 2.0,
    max_seconds: float = 3600.0,
    host: str = "127.0.0.1",
    onnx_path: Path | None = None,
) -> SoakResult:
    """Publish the model, start the stack, warm it up, soak it, stop everything; violations left empty."""
    require_loopback(host)
    if not 1 <= clients <= MAX_IN_FLIGHT:  # more would be answered 429 by the stack's max_in_flight
        raise ChaosError(f"clients must be in [1, {MAX_IN_FLIGHT}], got {clients}")
    repository = work_dir / "model_repository"
    repository.mkdir(parents=True, exist_ok=True)
    publish_version(onnx_path or export_untrained(work_dir / "model.onnx"), repository)
    stack = ChaosStack(repository, work_dir, host)
    gateway = None
    try:
        _wait_until(stack.ready, READY_TIMEOUT_S, "the stack's first start")
        metadata = httpx.get(f"{stack.url}/v2/models/{MODEL}", timeout=10).json()
        rng = random.Random(seed)
        kinds = request_mix(metadata["inputs"][0], rng)
        gateway = Gateway(stack)
        outcomes, samples = Outcomes(), [gateway.sample("start", 0)]
        started = time.monotonic()
        deadline = started + max_seconds

        async def drive() -> tuple[Sample, Sample]:
            common = (kinds, clients, rng, outcomes, samples, sample_every_s, deadline)
            await _phase(gateway, "warm-up", warmup, *common)
            baseline = await asyncio.to_thread(gateway.at_rest, "at rest", outcomes.answered)
            samples.append(baseline)
            log.info("warmed up with %d requests; soaking with %d", warmup, requests)
            await _phase(gateway, "soak", requests, *common)
            end = await asyncio.to_thread(gateway.at_rest, "at rest", outcomes.answered)
            samples.append(end)
            return baseline, end

        baseline, end = asyncio.run(drive())
        return SoakResult(
            kinds, outcomes, samples, baseline, end, requests, warmup, clients, time.monotonic() - started
        )
    finally:
        if gateway is not None:
            gateway.close()
        stack.close()


# --- the report -----------------------------------------------------------------------------------------------


def render_tables(result: SoakResult, max_rss_growth: float) -> str:
    base, end = result.baseline, result.end
    mib = 2**20

    def row(name: str, before: str, after: str, change: str, bound: str, held: bool) -> str:
        return f"| {name} | {before} | {after} | {change} | {bound} | {'yes' if held else 'NO'} |"

    lines = [
        "| at rest, gateway process | after warm-up | after soak | change | bound | held |",
        "|---|---|---|---|---|---|",
        row(
            "RSS MiB",
            f"{base.rss_bytes / mib:.1f}",
            f"{end.rss_bytes / mib:.1f}",
            f"{result.rss_growth:+.2%}",
            f"<= {max_rss_growth:.0%}",
            result.rss_growth <= max_rss_growth,
        ),
        row(
            "open fds, less pooled",
            str(base.own_fds),
            str(end.own_fds),
            f"{end.own_fds - base.own_fds:+d}",
            "0",
            end.own_fds == base.own_fds,
        ),
        row(
            "pooled connections to Triton HTTP",
            str(base.pooled),
            str(end.pooled),
            f"{end.pooled - base.pooled:+d}",
            f"<= {result.clients} (clients)",
            end.pooled <= result.clients,
        ),
        row(
            "threads",
            str(base.threads),
            str(end.threads),
            f"{end.threads - base.threads:+d}",
            "0",
            end.threads == base.threads,
        ),
        row(
            "shm free slots",
            f"{base.free_slots:g}" if base.free_slots is not None else "-",
            f"{end.free_slots:g}" if end.free_slots is not None else "-",
            "-" if base.free_slots is None or end.free_slots is None else f"{end.free_slots - base.free_slots:+g}",
            "0",
            end.free_slots == base.free_slots,
        ),
        "",
    ]
    during = [s for s in result.samples if s.phase == "soak"]
    if during:
        rss = [s.rss_bytes for s in during]
        lines += [
            "| during the soak | min | max |",
            "|---|---|---|",
            f"| RSS MiB | {min(rss) / mib:.1f} | {max(rss) / mib:.1f} |",
            f"| open fds | {min(s.fds for s in during)} | {max(s.fds for s in during)} |",
            f"| threads | {min(s.threads for s in during)} | {max(s.threads for s in during)} |",
        ]
        slots = [s.free_slots for s in during if s.free_slots is not None]
        if slots:
            lines.append(f"| shm free slots | {min(slots):g} | {max(slots):g} |")
        lines.append("")
    statuses = sorted({outcome for _, outcome in result.outcomes.counts}, key=lambda o: (not o.isdigit(), o))
    lines += [
        "| request kind | weight | expected | " + " | ".join(statuses) + " |",
        "|---|---|---|" + "---|" * len(statuses),
    ]
    for kind in result.kinds:
        counts = [str(result.outcomes.counts.get((kind.name, s), 0)) for s in statuses]
        expected = "/".join(map(str, sorted(kind.expected)))
        lines.append(
            f"| {kind.name}{' (bad)' if kind.bad else ''} | {kind.weight} | {expected} | " + " | ".join(counts) + " |"
        )
    return "\n".join(lines)


def write_samples(samples: Sequence[Sample], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["elapsed_s", "phase", "requests", "rss_bytes", "fds", "pooled", "threads", "shm_free_slots"])
        for s in samples:
            free = "" if s.free_slots is None else f"{s.free_slots:g}"
            writer.writerow([f"{s.elapsed_s:.2f}", s.phase, s.requests, s.rss_bytes, s.fds, s.pooled, s.threads, free])


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    x = [s.requests for s in samples]
    series = [
        ("RSS MiB", [s.rss_bytes / 2**20 for s in samples]),
        ("open fds", [s.fds for s in samples]),
        ("threads", [s.threads for s in samples]),
        ("shm free slots", [s.free_slots if s.free_slots is not None else float("nan") for s in samples]),
    ]
    figure, axes = plt.subplots(len(series), 1, figsize=(10, 8), sharex=True)
    for axis, (label, values) in zip(axes, series, strict=True):
        axis.plot(x, values, marker=".", linewidth=1)
        axis.axvline(result.baseline.requests, color="0.6", linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_title("gateway process during the run (dashed: end of the warm-up)")
    axes[-1].set_xlabel("requests answered")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(result: SoakResult, folder: Path, *, command: str, max_rss_growth: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_samples(result.samples, folder / "soak-samples.csv")
    plot(result, folder / "soak.png")
    verdict = (
        "All invariants held."
        if not result.violations
        else "Invariants broken:\n\n" + "\n".join(f"- {v}" for v in result.violations)
    )
    rate = (result.warmup + result.soaked) / result.seconds if result.seconds else 0.0
    text = f"""# Soak run

`{command}`: {result.warmup} warm-up requests, then {result.soaked} in the soak, {result.clients} closed-loop
clients, {result.seconds:.0f} s in all ({rate:.0f} requests/s). The gateway with
max_in_flight={MAX_IN_FLIGHT} and its default shared-memory region. "At rest": no client connected and the
gateway's descriptors and threads steady for {SETTLE_STEADY_READS} readings {SETTLE_POLL_S:g} s apart. "Pooled":
the KServe pass-through's idle keep-alive connections to Triton, as many as its requests ever overlapped.
Every sample: soak-samples.csv.

{render_tables(result, max_rss_growth)}

{verdict}

![the gateway process during the run](soak.png)
"""
    path = folder / "soak.md"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests in the soak (default 20000)")
    parser.add_argument("--warmup", type=int, default=2_000, help="requests before the baseline (default 2000)")
    parser.add_argument(
        "--clients", type=int, default=MAX_IN_FLIGHT, help=f"closed-loop clients (default {MAX_IN_FLIGHT})"
    )
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="time bound of the run (default 3600)")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="RSS growth allowed (default 0.05)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the request mix's random seed (default 0)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address the stack listens on")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of reports (default loadtests/reports)")
    args = parser.parse_args(argv)
    if not (
        1 <= args.requests <= MAX_REQUESTS
        and 0 <= args.warmup <= MAX_REQUESTS
        and 1 <= args.clients <= MAX_IN_FLIGHT
        and 0 < args.max_seconds <= 24 * 3600
        and 0 < args.max_rss_growth
        and 0 < args.sample_every <= 60
    ):
        print(
            f"soak: error: --requests must be in [1, {MAX_REQUESTS}], --warmup in [0, {MAX_REQUESTS}], --clients in "
            f"[1, {MAX_IN_FLIGHT}], --max-seconds in (0, 86400], --max-rss-growth > 0, --sample-every in (0, 60]",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    folder = args.out / dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    # SIGTERM as Ctrl-C: either unwinds through run_soak, which stops the stack and all it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _work_dir() as work_dir:
            result = run_soak(
                work_dir=work_dir,
                requests=args.requests,
                warmup=args.warmup,
                clients=args.clients,
                seed=args.seed,
                sample_every_s=args.sample_every,
                max_seconds=args.max_seconds,
                host=args.host,
            )
    except (ChaosError, TargetRefused) as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    result.violations = check(result, args.max_rss_growth)
    command = "python -m loadtests.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(result, folder, command=command.strip(), max_rss_growth=args.max_rss_growth)
    print(render_tables(result, args.max_rss_growth))
    print(f"report: {report}")
    for violation in result.violations:
        print(f"soak: invariant broken: {violation}", file=sys.stderr)
    return 1 if result.violations else 0


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        yield Path(folder)


if __name__ == "__main__":
    sys.exit(main())
