"""`python -m loadtests.canary`: bad canaries routed away automatically under steady load.

Publishes a small untrained classifier (version 1) into a temporary repository, starts `python -m stack` on
free loopback ports, and runs, each as a canary of version 1 published with `publish --canary` (the default
shadow share and guard rails):

- `wrong`: the same graph and weights with its classes rolled by one (every top-1 answer differs from the
  stable version's, as a model trained with its labels in another order would): the agreement rail;
- `slow`: the same answers with more work per image (a chain of tanh(x @ W) layers whose result is added
  times zero), as a heavier architecture would be: the p99 rail;
- `share`: the same model again, at 10%: the share of 2,000 requests it answers.

Closed-loop clients send classify requests until the gateway halts the canary (its
`gateway_rollout_canary_halted` metric) and `--after` more requests have been answered, or `--max-seconds`
pass. Every answer must be 200: a halt fails no request. Prints one table row per scenario, and exits 1 when
a bad canary is not halted, or a request fails; 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .chaos import MODEL, READY_TIMEOUT_S, ChaosError, ChaosStack, export_untrained, wait_until
from .targets import TargetRefused

log = logging.getLogger("loadtests.canary")

SCENARIOS = ("wrong", "slow", "share")
FOLLOW_TIMEOUT_S = 60.0  # for Triton to load a published version and the gateway to read the rollout
SHARE_REQUESTS = 2000
SHARE_PERCENT = 10.0
IMAGES = 16  # distinct inputs, drawn at random per request


# --- canary models --------------------------------------------------------------------------------------------


def _producer_renamed(model, output: str, renamed: str) -> None:
    """The node that wrote graph output `output` writes `renamed` instead."""
    for node in model.graph.node:
        node.output[:] = [renamed if name == output else name for name in node.output]


def with_classes_rolled(source: Path, target: Path) -> Path:
    """`source` answering class c+1 where it answered c (the last class wraps to 0): its scores, rolled."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    output = model.graph.output[0]
    classes = output.type.tensor_type.shape.dim[1].dim_value
    raw = f"{output.name}_unrolled"
    _producer_renamed(model, output.name, raw)
    order = np.array([(c - 1) % classes for c in range(classes)], np.int64)
    model.graph.initializer.append(numpy_helper.from_array(order, "rolled_classes"))
    model.graph.node.append(helper.make_node("Gather", [raw, "rolled_classes"], [output.name], axis=1))
    onnx.save(model, str(target))
    return target


def with_extra_work(source: Path, target: Path, width: int = 2048, layers: int = 12) -> Path:
    """`source` with the same answers and `layers` x width^2 multiply-adds more per image: a chain of
    tanh(h @ W) on the flattened input, summed and added to the scores times zero (tanh keeps it finite)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    image = graph.input[0]
    pixels = int(np.prod([d.dim_value for d in image.type.tensor_type.shape.dim[1:]]))
    output = graph.output[0].name
    raw = f"{output}_before_extra_work"
    _producer_renamed(model, output, raw)
    generator = np.random.default_rng(0)
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                (generator.standard_normal((pixels, width)) / np.sqrt(pixels)).astype(np.float32), "extra_in"
            ),
            numpy_helper.from_array(
                (generator.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "extra_w"
            ),
            numpy_helper.from_array(np.array([1], np.int64), "extra_axes"),
            numpy_helper.from_array(np.array(0.0, np.float32), "extra_zero"),
        ]
    )
    nodes = [
        helper.make_node("Flatten", [image.name], ["extra_flat"]),
        helper.make_node("MatMul", ["extra_flat", "extra_in"], ["extra_0"]),
    ]
    for layer in range(layers):
        nodes += [
            helper.make_node("MatMul", [f"extra_{layer}", "extra_w"], [f"extra_mm_{layer}"]),
            helper.make_node("Tanh", [f"extra_mm_{layer}"], [f"extra_{layer + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", [f"extra_{layers}", "extra_axes"], ["extra_sum"], keepdims=1),
        helper.make_node("Mul", ["extra_sum", "extra_zero"], ["extra_nothing"]),
        helper.make_node("Add", [raw, "extra_nothing"], [output]),
    ]
    graph.node.extend(nodes)
    onnx.save(model, str(target))
    return target


# --- the run --------------------------------------------------------------------------------------------------


def sample_images(count: int = IMAGES) -> list[bytes]:
    from PIL import Image

    generator = np.random.default_rng(1)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


@dataclass
class Outcome:
    scenario: str
    canary: int
    requests: int = 0
    failed: int = 0
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    halted: str | None = None
    # At the halt: requests answered so far, and of them the canary's.
    requests_before_halt: int | None = None
    canary_before_halt: int | None = None
    seconds_to_halt: float | None = None
    status: dict = field(default_factory=dict)

    def row(self) -> str:
        share = self.versions[str(self.canary)] / self.requests if self.requests else 0.0
        return (
            f"| {self.scenario} | {self.canary} | {self.requests} | {self.failed} | {self.halted or '-'} | "
            f"{self.requests_before_halt if self.requests_before_halt is not None else '-'} | "
            f"{self.canary_before_halt if self.canary_before_halt is not None else '-'} | "
            f"{f'{self.seconds_to_halt:.1f}' if self.seconds_to_halt is not None else '-'} | "
            f"{self.versions[str(self.canary)]} ({share:.1%}) |"
        )


HEADER = (
    "| scenario | canary | requests | failed | halted by | requests before halt | canary answers before halt "
    "| s to halt | canary answers (share) |\n|---|---|---|---|---|---|---|---|---|"
)


def halted_reason(url: str, canary: int) -> str | None:
    from builder.rollout import traffic

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return traffic(text, MODEL).get(str(canary), {}).get("halted")


def follows(url: str, canary: int) -> bool:
    try:
        answer = httpx.get(f"{url}/v1/models/{MODEL}", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return False
    rollout = answer.get("rollout") or {}
    ready = {v["version"] for v in answer.get("versions", []) if v["state"] == "READY"}
    return rollout.get("canary") == canary and str(canary) in ready


async def drive(url: str, outcome: Outcome, clients: int, stop_after: int | None, after: int, max_s: float) -> None:
    """Closed-loop classify requests until `stop_after` are answered, or `after` more once the canary is halted,
    or `max_s` seconds; the halt is read from /metrics between requests."""
    images = sample_images()
    started = time.monotonic()
    done = asyncio.Event()
    generator = np.random.default_rng(2)

    async def client(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            image = images[int(generator.integers(len(images)))]
            try:
                answer = await http.post(
                    f"{url}/v1/models/{MODEL}/classify", content=image, headers={"Content-Type": "image/png"}
                )
                status, version = answer.status_code, answer.json().get("version") if answer.is_success else None
            except httpx.HTTPError as e:
                status, version = type(e).__name__, None
            outcome.requests += 1
            outcome.statuses[status] += 1
            if status != 200:
                outcome.failed += 1
            if version:
                outcome.versions[version] += 1
            if stop_after is not None and outcome.requests >= stop_after:
                done.set()
            halted_at = outcome.requests_before_halt
            if stop_after is None and halted_at is not None and outcome.requests >= halted_at + after:
                done.set()
            if time.monotonic() - started > max_s:
                done.set()

    async def watch_halt(http: httpx.AsyncClient) -> None:
        while not done.is_set() and outcome.requests_before_halt is None:
            text = (await http.get(f"{url}/metrics")).text
            from builder.rollout import traffic

            reason = traffic(text, MODEL).get(str(outcome.canary), {}).get("halted")
            if reason:
                outcome.halted = reason
                outcome.requests_before_halt = outcome.requests
                outcome.canary_before_halt = outcome.versions[str(outcome.canary)]
                outcome.seconds_to_halt = time.monotonic() - started
                return
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(watch_halt(http), *(client(http) for _ in range(clients)))


def run(names: Sequence[str], work_dir: Path, clients: int, after: int, max_s: float, host: str) -> list[Outcome]:
    from builder import rollout
    from builder.publish import PublishSettings, publish

    stable = export_untrained(work_dir / "stable.onnx")
    repository = work_dir / "repository"
    one = PublishSettings(instance_count=1)
    publish(stable, repository, MODEL, settings=one)
    variants = {
        "wrong": lambda: with_classes_rolled(stable, work_dir / "wrong.onnx"),
        "slow": lambda: with_extra_work(stable, work_dir / "slow.onnx"),
        "share": lambda: stable,
    }
    stack = ChaosStack(repository, work_dir, host=host)
    outcomes = []
    try:
        wait_until(stack.ready, READY_TIMEOUT_S, "the stack serves")
        for name in names:
            percent = SHARE_PERCENT if name == "share" else 10.0
            canary = publish(
                variants[name](), repository, MODEL, settings=PublishSettings(instance_count=1, canary_percent=percent)
            ).version
            wait_until(lambda canary=canary: follows(stack.url, canary), FOLLOW_TIMEOUT_S, f"version {canary} served")
            outcome = Outcome(name, canary)
            stop_after = SHARE_REQUESTS if name == "share" else None
            asyncio.run(drive(stack.url, outcome, clients, stop_after, after, max_s))
            outcome.status = rollout.status(repository, MODEL, stack.url)
            if name == "share" and outcome.halted is None:
                outcome.halted = halted_reason(stack.url, canary)
            log.info("%s: %s", name, outcome.row())
            outcomes.append(outcome)
            rollout.abort(repository, MODEL)
            wait_until(
                lambda: httpx.get(f"{stack.url}/v1/models/{MODEL}", timeout=10).json().get("rollout") is None,
                FOLLOW_TIMEOUT_S,
                "the rollout aborted",
            )
    finally:
        stack.close()
    return outcomes


def violations(outcomes: Sequence[Outcome]) -> list[str]:
    found = []
    for outcome in outcomes:
        if outcome.failed:
            found.append(f"{outcome.scenario}: {outcome.failed} requests failed: {dict(outcome.statuses)}")
        if outcome.scenario != "share" and not outcome.halted:
            found.append(f"{outcome.scenario}: canary version {outcome.canary} was not halted")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.canary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"default: {','.join(SCENARIOS)}")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients (default 4)")
    parser.add_argument("--after", type=int, default=200, help="requests sent once the canary is halted (200)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per scenario (default 120)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address the stack listens on")
    parser.add_argument("--json", action="store_true", help="also print each scenario's --status as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not 1 <= args.clients <= 4 or not 0 < args.max_seconds <= 600 or not 0 <= args.after <= 10_000:
        print(
            f"canary: error: scenarios among {','.join(SCENARIOS)}, --clients in [1, 4] (the stack admits 4 at "
            "once), --max-seconds in (0, 600], --after in [0, 10000]",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _work_dir() as work_dir:
            outcomes = run(names, work_dir, args.clients, args.after, args.max_seconds, args.host)
    except (ChaosError, TargetRefused) as e:
        print(f"canary: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("canary: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(HEADER)
    for outcome in outcomes:
        print(outcome.row())
    if args.json:
        for outcome in outcomes:
            print(json.dumps({"scenario": outcome.scenario, "status": outcome.status}))
    found = violations(outcomes)
    for violation in found:
        print(f"canary: invariant broken: {violation}", file=sys.stderr)
    return 1 if found else 0


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="canary-") as folder:
        yield Path(folder)


if __name__ == "__main__":
    sys.exit(main())
