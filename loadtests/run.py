"""`python -m loadtests.run` (make loadtest): a headless locust run against the local stack, and its report.

Uses the stack that answers at the target, or starts one (Triton and the gateway on free loopback ports)
for the run. Writes loadtests/reports/<timestamp>/: locust's CSVs and HTML report, the gateway's and
Triton's metrics before and after, summary.md, summary.json and latency.png. Exits 1 when the failure
ratio or p99 is over the limits given, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from .render import plot_latency, render_markdown
from .report import Thresholds, build_summary, check_thresholds
from .targets import TargetRefused, require_loopback

log = logging.getLogger("loadtests.run")

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"gateway": "GatewayUser", "triton": "TritonGrpcUser"}
DURATION = re.compile(r"^\d+[smh]?$|^(\d+h)?(\d+m)?(\d+s)?$")


class RunError(RuntimeError):
    """The load test could not be run (no stack, locust failed to start, no statistics written)."""


@dataclass(frozen=True)
class Endpoints:
    """Where the stack under test answers."""

    gateway_url: str = "http://127.0.0.1:8080"
    triton_http: str = "127.0.0.1:8000"
    triton_grpc: str = "127.0.0.1:8001"
    triton_metrics: str = "http://127.0.0.1:8002/metrics"

    def all(self) -> tuple[str, ...]:
        return (self.gateway_url, self.triton_http, self.triton_grpc, self.triton_metrics)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def target_answers(endpoints: Endpoints, target: str) -> bool:
    if target == "gateway":
        return _answers(f"{endpoints.gateway_url}/healthz")
    return _answers(f"http://{endpoints.triton_http}/v2/health/ready")


@contextlib.contextmanager
def stack_for(endpoints: Endpoints, target: str, repository: str) -> Iterator[Endpoints]:
    """The endpoints of a stack that answers at the target: the running one, or one started for this run."""
    if target_answers(endpoints, target):
        log.info(
            "using the %s that answers at %s",
            target,
            endpoints.gateway_url if target == "gateway" else endpoints.triton_http,
        )
        yield endpoints
        return
    from stack.launcher import LaunchError, free_port
    from stack.settings import TritonSettings
    from stack.supervisor import local_stack

    log.info("nothing answers at the %s; starting Triton and the gateway on %s", target, repository)
    # Free ports rather than the defaults: another stack on this machine may hold them without answering.
    settings = TritonSettings(
        model_repository=repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    try:
        with local_stack(settings, gateway_host="127.0.0.1", gateway_port=free_port()) as (triton, gateway):
            yield Endpoints(
                gateway_url=gateway.url,
                triton_http=triton.http_url,
                triton_grpc=triton.grpc_url,
                triton_metrics=triton.metrics_url,
            )
    except LaunchError as e:
        raise RunError(f"could not start the local stack: {e}") from e


def scrape(endpoints: Endpoints, model: str, folder: Path) -> None:
    """The gateway's and Triton's Prometheus metrics and Triton's statistics for the model, as files."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = {
        "gateway.prom": f"{endpoints.gateway_url}/metrics",
        "triton.prom": endpoints.triton_metrics,
        "triton-stats.json": f"http://{endpoints.triton_http}/v2/models/{model}/stats",
    }
    for name, url in sources.items():
        try:
            response = httpx.get(url, timeout=5.0)
            response.raise_for_status()
        except httpx.HTTPError as e:
            log.warning("could not scrape %s (%s); the report will lack it", url, e)
            continue
        (folder / name).write_text(response.text)


def _executions(endpoints: Endpoints, model: str) -> tuple[float, int] | None:
    """Executions for the model by Triton's Prometheus counter and by its statistics API."""
    from .report import parse_samples, total

    try:
        metrics = httpx.get(endpoints.triton_metrics, timeout=5.0).text
        stats = httpx.get(f"http://{endpoints.triton_http}/v2/models/{model}/stats", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return None
    counted = sum(int(entry.get("execution_count", 0)) for entry in stats.get("model_stats", []))
    return total(parse_samples(metrics), "nv_inference_exec_count", model=model), counted


def wait_until_settled(endpoints: Endpoints, model: str, timeout_s: float = 5.0) -> None:
    """Wait (a little) for Triton's two sources of counts to agree, so the batch-size table adds up.

    They can disagree for good: the statistics API restarts from zero when the model is reloaded, the
    Prometheus counters do not.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = _executions(endpoints, model)
        if counts is None or counts[0] == counts[1]:
            return
        time.sleep(0.5)
    log.warning(
        "Triton's statistics API and its metrics disagree on executions (was the model reloaded?); "
        "the batch-size table covers only what the statistics API counted"
    )


def locust_command(args: argparse.Namespace, endpoints: Endpoints, report_dir: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--csv",
        str(report_dir / "locust"),
        "--csv-full-history",
        "--html",
        str(report_dir / "locust.html"),
        "--logfile",
        str(report_dir / "locust.log"),
        "--stop-timeout",
        "10",
        # The verdict is ours (thresholds below), not locust's exit code for "some request failed".
        "--exit-code-on-error",
        "0",
    ]
    if not args.ramp:  # the ramp sets users itself and ends when p99 crosses the budget
        command += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration]
    if args.target == "gateway":
        command += ["--host", endpoints.gateway_url]
    return command + [USER_CLASSES[args.target]]


def locust_environment(args: argparse.Namespace, endpoints: Endpoints, report_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "LOADTEST_MODEL": args.model,
        "LOADTEST_TRITON_GRPC": endpoints.triton_grpc,
        "LOADTEST_IMAGES_PER_REQUEST": str(args.images_per_request),
        "LOADTEST_USER_RPS": str(args.user_rps or 0),
    }
    if args.images:
        env["LOADTEST_IMAGES"] = args.images
    if args.target == "triton" and "LOADTEST_TRITON_KEY" not in env:
        # The local stack's Triton answers inference only with its key (kept out of the report).
        from stack.settings import TritonSettings
        from stack.supervisor import triton_api_key

        env["LOADTEST_TRITON_KEY"] = triton_api_key(TritonSettings()) or ""
    if args.ramp:
        env.update(
            LOADTEST_SHAPE="ramp",
            LOADTEST_P99_BUDGET_MS=str(args.p99_budget_ms),
            LOADTEST_RAMP_STEP_USERS=str(args.ramp_step_users),
            LOADTEST_RAMP_STEP_S=str(args.ramp_step_s),
            LOADTEST_RAMP_MAX_USERS=str(args.ramp_max_users),
            LOADTEST_RAMP_OUT=str(report_dir / "ramp.json"),
        )
    else:
        env.pop("LOADTEST_SHAPE", None)
    return env


def run_locust(args: argparse.Namespace, endpoints: Endpoints, report_dir: Path) -> None:
    command = locust_command(args, endpoints, report_dir)
    log.info("running %s", " ".join(command[1:]))
    with open(report_dir / "locust.out", "wb") as output:
        finished = subprocess.run(
            command, env=locust_environment(args, endpoints, report_dir), stdout=output, stderr=subprocess.STDOUT
        )
    if not (report_dir / "locust_stats.csv").exists():
        tail = (report_dir / "locust.out").read_text(errors="replace").splitlines()[-15:]
        raise RunError(f"locust exited with code {finished.returncode} without statistics:\n" + "\n".join(tail))


def write_report(args: argparse.Namespace, endpoints: Endpoints, report_dir: Path) -> list[str]:
    """summary.md, summary.json and latency.png from the files of the run; returns the threshold problems."""
    # The endpoints actually load-tested replace the requested ones (a stack started here has its own ports).
    settings = {
        key: str(value)
        for key, value in sorted({**vars(args), **dataclasses.asdict(endpoints)}.items())
        if value is not None
    }
    summary = build_summary(report_dir, target=args.target, settings=settings)
    problems = check_thresholds(summary, Thresholds(args.fail_ratio, args.max_p99_ms))
    (report_dir / "summary.md").write_text(render_markdown(summary, problems))
    (report_dir / "summary.json").write_text(
        json.dumps({**dataclasses.asdict(summary), "problems": problems}, indent=1, default=str)
    )
    plot_latency(summary, report_dir / "latency.png", max_p99_ms=args.max_p99_ms)
    return problems


def new_report_dir(reports: Path) -> Path:
    """reports/<timestamp>, with a suffix when two runs start within the same second."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = reports / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RunError(f"cannot make a new report folder in {reports}")


def run(args: argparse.Namespace) -> int:
    requested = Endpoints(args.gateway_url, args.triton_http, args.triton_grpc, args.triton_metrics)
    for address in requested.all():
        require_loopback(address)
    report_dir = new_report_dir(Path(args.reports))
    with stack_for(requested, args.target, args.repository) as endpoints:
        scrape(endpoints, args.model, report_dir / "metrics-before")
        run_locust(args, endpoints, report_dir)
        wait_until_settled(endpoints, args.model)
        scrape(endpoints, args.model, report_dir / "metrics-after")
    problems = write_report(args, endpoints, report_dir)
    print(f"report: {report_dir / 'summary.md'}")
    for problem in problems:
        print(f"threshold exceeded: {problem}", file=sys.stderr)
    return 1 if problems else 0


def duration(value: str) -> str:
    if not DURATION.match(value) or value in ("", "0"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 30, 30s, 2m or 1m30s")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--target",
        choices=sorted(USER_CLASSES),
        default="gateway",
        help="gateway: HTTP with images; triton: gRPC with preprocessed tensors",
    )
    p.add_argument("--users", type=int, default=8, help="concurrent users (ignored with --ramp)")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--duration", type=duration, default="30s", help="run time: 30, 30s, 2m, 1m30s")
    p.add_argument("--model", default="digits")
    p.add_argument("--images", help="folder of images (default: sample photos in .cache/loadtest-images)")
    p.add_argument("--images-per-request", type=int, default=4, help="images in the several-image requests")
    p.add_argument("--user-rps", type=float, help="requests per second per user (default: back to back)")
    p.add_argument("--fail-ratio", type=float, default=0.01, help="exit 1 when more requests than this failed")
    p.add_argument("--max-p99-ms", type=float, help="exit 1 when p99 over the whole run is above this")
    p.add_argument("--ramp", action="store_true", help="step users up until p99 crosses --p99-budget-ms")
    p.add_argument("--p99-budget-ms", type=float, default=250.0)
    p.add_argument("--ramp-step-users", type=int, default=2)
    p.add_argument("--ramp-step-s", type=float, default=15.0)
    p.add_argument("--ramp-max-users", type=int, default=64)
    p.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    p.add_argument("--triton-http", default="127.0.0.1:8000")
    p.add_argument("--triton-grpc", default="127.0.0.1:8001")
    p.add_argument("--triton-metrics", default="http://127.0.0.1:8002/metrics")
    p.add_argument(
        "--repository",
        default=os.environ.get("TRITON_MODEL_REPOSITORY", "model_repository"),
        help="model repository for a stack started by this run",
    )
    p.add_argument("--reports", default="loadtests/reports", help="folder for the report folders")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape drowns the progress
    if args.users < 1 or args.spawn_rate <= 0 or args.images_per_request < 1:
        print(
            "loadtest: error: --users and --images-per-request need at least 1, --spawn-rate more than 0",
            file=sys.stderr,
        )
        return 2
    try:
        return run(args)
    except (RunError, TargetRefused) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
