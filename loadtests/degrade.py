"""`python -m loadtests.degrade`: goodput under overload with graceful degradation off and on, in one run.

Publishes the slow (FP32) and the fast (INT8) ONNX of one build three times into a repository of its own:
SLOW (no setting), SLOW-degrading (degrading to FAST) and FAST; starts Triton and the gateway on free
loopback ports; then

1. finds the slow model's saturation with open-loop steps of rising arrival rate (degradation off): the
   highest rate whose requests were all answered 200, with a median latency within the budget;
2. offers twice that rate, open loop (constant arrivals, each request sent whether or not earlier ones
   are answered, as clients of a service do), for a bounded time per round, alternating degradation off
   (SLOW) and on (SLOW-degrading);

and prints, per round and per setting: goodput (200 answers within the budget, per second of the round),
the share of answers a degraded variant gave, errors (by status) and latency. Requests are single raw
images, round-robin over the load tests' sample photos. Everything goes to 127.0.0.1 and is bounded: each
request by the client timeout, each round by its seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("loadtests.degrade")

CLIENT_TIMEOUT_S = 10.0
MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}


@dataclass
class Round:
    label: str
    model: str
    rate: float
    seconds: float
    sent: int = 0
    ok_in_budget: int = 0
    degraded: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None  # of the 200 answers

    def goodput(self) -> float:
        return self.ok_in_budget / self.seconds

    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def degraded_share(self) -> float:
        return self.degraded / self.ok() if self.ok() else 0.0


async def open_loop(
    client: httpx.AsyncClient,
    url: str,
    images: Sequence[tuple[bytes, str]],
    label: str,
    model: str,
    rate: float,
    seconds: float,
    budget_s: float,
) -> Round:
    """`rate` requests per second for `seconds`, each started on its schedule whatever the others do."""
    result = Round(label, model, rate, seconds)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []

    async def one(i: int) -> None:
        body, media_type = images[i % len(images)]
        started = time.perf_counter()
        try:
            response = await client.post(
                f"{url}/v1/models/{model}/classify", content=body, headers={"Content-Type": media_type}
            )
        except httpx.TimeoutException:
            statuses["timeout"] += 1
            return
        except httpx.HTTPError:
            statuses["connection"] += 1
            return
        elapsed = time.perf_counter() - started
        statuses[str(response.status_code)] += 1
        if response.status_code == 200:
            latencies.append(elapsed)
            result.ok_in_budget += elapsed <= budget_s
            result.degraded += bool(response.json().get("degraded"))

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    count = int(rate * seconds)
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    result.sent = count
    result.statuses = dict(sorted(statuses.items()))
    if latencies:
        result.p50_ms = round(float(np.percentile(latencies, 50)) * 1000, 1)
        result.p99_ms = round(float(np.percentile(latencies, 99)) * 1000, 1)
    return result


async def settle(client: httpx.AsyncClient, url: str, deadline_s: float = 30.0) -> None:
    """Until the gateway has nothing in flight (what a round left behind), at most `deadline_s`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = (await client.get(f"{url}/metrics")).text
        values = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("gateway_in_flight")]
        if not any(values):
            return
        await asyncio.sleep(0.2)


def saturated(step: Round, budget_s: float) -> bool:
    """Past saturation: an error, or a median latency over the budget (arrivals faster than the model serves
    them queue up, and the latency grows through the step). The median, not the p99: on a machine shared
    with other work a burst from elsewhere moves the p99 of a short step, not the median."""
    return step.ok() < step.sent or step.p50_ms is None or step.p50_ms > budget_s * 1000


async def measure(args: argparse.Namespace, url: str, slow: str, degrading: str) -> dict:
    from .samples import write_samples

    images = [(p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in write_samples()]
    budget_s = args.budget_ms / 1000
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        # Every model answers once before anything is timed (the models are warmed; the connections are not).
        for model in (slow, degrading, args.fast_name):
            await open_loop(client, url, images, "warm", model, 5, 2, budget_s)
        steps: list[Round] = []
        rate = args.ramp_start
        while rate <= args.ramp_max:
            await settle(client, url)
            step = await open_loop(client, url, images, "ramp", slow, rate, args.ramp_seconds, budget_s)
            steps.append(step)
            log.info("ramp %s req/s: %s", rate, _line(step))
            if saturated(step, budget_s):
                break
            rate += args.ramp_step
        sustained = [s.rate for s in steps if not saturated(s, budget_s)]
        saturation = args.saturation or (max(sustained) if sustained else args.ramp_start)
        overload = 2 * saturation
        rounds: list[Round] = []
        for n in range(args.rounds):
            for label, model in (("off", slow), ("on", degrading)):
                await settle(client, url)
                result = await open_loop(client, url, images, label, model, overload, args.seconds, budget_s)
                rounds.append(result)
                log.info("round %d degradation %s at %s req/s: %s", n + 1, label, overload, _line(result))
    summary = {
        label: {
            "goodput_per_s": round(sum(r.ok_in_budget for r in ours) / sum(r.seconds for r in ours), 2),
            "degraded_share": round(sum(r.degraded for r in ours) / max(1, sum(r.ok() for r in ours)), 3),
            "sent": sum(r.sent for r in ours),
            "statuses": dict(sum((Counter(r.statuses) for r in ours), Counter())),
        }
        for label in ("off", "on")
        for ours in [[r for r in rounds if r.label == label]]
    }
    off, on = summary["off"]["goodput_per_s"], summary["on"]["goodput_per_s"]
    return {
        "budget_ms": args.budget_ms,
        "saturation_req_per_s": saturation,
        "overload_req_per_s": overload,
        "ramp": [asdict(s) for s in steps],
        "rounds": [asdict(r) for r in rounds],
        "summary": summary,
        "goodput_ratio": round(on / off, 2) if off else None,
    }


def _line(r: Round) -> str:
    return (
        f"goodput {r.goodput():.1f}/s, {r.ok()}/{r.sent} answered, degraded {r.degraded_share():.0%}, "
        f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, statuses {r.statuses}"
    )


def publish_models(args: argparse.Namespace, repository: Path) -> tuple[str, str]:
    from builder import degrade
    from builder.publish import PublishSettings, publish

    degrading = f"{args.slow_name}-degrading"
    for onnx, name in ((args.slow, args.slow_name), (args.slow, degrading), (args.fast, args.fast_name)):
        publish(Path(onnx), repository, name, settings=PublishSettings(max_accuracy_drop=100.0))
    degrade.enable(repository, degrading, args.fast_name, args.in_flight, args.to_in_flight)
    return args.slow_name, degrading


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.degrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", required=True, help="the slow model's ONNX (e.g. a build's fp32.onnx)")
    parser.add_argument("--fast", required=True, help="the fast model's ONNX (e.g. the same build's int8.onnx)")
    parser.add_argument("--slow-name", default="digits-fp32")
    parser.add_argument("--fast-name", default="digits-int8")
    parser.add_argument("--in-flight", type=int, default=1, help="degrade past this many slow requests in flight")
    parser.add_argument("--to-in-flight", type=int, default=8, help="429 past this many fast requests in flight")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (thresholds are per worker)")
    parser.add_argument("--budget-ms", type=float, default=250.0, help="latency budget of a good answer")
    parser.add_argument("--saturation", type=float, help="skip the ramp: the slow model's saturation, req/s")
    parser.add_argument("--ramp-start", type=float, default=20.0)
    parser.add_argument("--ramp-step", type=float, default=5.0)
    parser.add_argument("--ramp-max", type=float, default=80.0)
    parser.add_argument("--ramp-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each setting, interleaved")
    parser.add_argument("--seconds", type=float, default=20.0, help="per round")
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would cost the load generator

    from stack.launcher import sigterm_as_interrupt, triton_and_gateway

    gateway_env = {"GATEWAY_WORKERS": str(args.workers), "GATEWAY_TRITON_TIMEOUT_S": str(CLIENT_TIMEOUT_S)}
    with sigterm_as_interrupt():
        folder = Path(tempfile.mkdtemp(prefix="degrade-loadtest-"))
        try:
            slow, degrading = publish_models(args, folder / "repo")
            with triton_and_gateway(folder / "repo", folder, gateway_env) as (_, gateway):
                report = asyncio.run(measure(args, gateway.url, slow, degrading))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: report[k] for k in ("budget_ms", "saturation_req_per_s", "overload_req_per_s")}))
    print(json.dumps(report["summary"], indent=2))
    print(f"goodput with degradation / without: {report['goodput_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
