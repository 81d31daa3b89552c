"""Locust scenarios for the gateway and for Triton.

    GatewayUser     the gateway over HTTP with real images: raw body, multipart, several images per request
    TritonGrpcUser  Triton directly over gRPC with tensors preprocessed by the model's published spec
    SaturationRamp  steps the user count up until p99 crosses a latency budget (only with LOADTEST_SHAPE=ramp)

Run one user class by naming it, e.g.
    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:8080 GatewayUser
or through `make loadtest` / `python -m loadtests.run`, which also writes the report. Distributed runs use
the same file: `locust -f loadtests/locustfile.py --master ...` and `... --worker --master-host HOST`.

Settings are environment variables (read on every worker):
    LOADTEST_IMAGES             folder of images (default: .cache/loadtest-images, sample photos made on demand)
    LOADTEST_MODEL              model name (digits)
    LOADTEST_IMAGES_PER_REQUEST images in the several-image requests (4)
    LOADTEST_TRITON_GRPC        Triton's gRPC endpoint for TritonGrpcUser (127.0.0.1:8001)
    LOADTEST_TRITON_KEY         Triton's key, where its inference API is restricted (the local stack's is)
    LOADTEST_USER_RPS           requests per second per user; unset, users send back to back
    LOADTEST_SHAPE=ramp         turn SaturationRamp on; LOADTEST_P99_BUDGET_MS (250), LOADTEST_RAMP_STEP_USERS (2),
                                LOADTEST_RAMP_STEP_S (15), LOADTEST_RAMP_SETTLE_S (2), LOADTEST_RAMP_WARMUP_S (5),
                                LOADTEST_RAMP_MAX_USERS (64), LOADTEST_RAMP_OUT (JSON file)
    LOADTEST_ALLOW_REMOTE=1     allow a target that is not a loopback address (a deployment you own)
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import time
import uuid
from pathlib import Path

try:
    # gRPC's blocking calls would stall every greenlet of the worker; this makes them cooperative.
    # Must run before the first channel is made. Absent where only the gateway is load-tested.
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()
except ImportError:  # pragma: no cover - locust image without grpcio
    grpc_gevent = None

try:
    from loadtests import samples, targets
    from loadtests.ramp import step_percentile
except ImportError:  # the locustfile's own folder mounted alone (the locust container): siblings import directly
    import samples
    import targets
    from ramp import step_percentile

from locust import LoadTestShape, User, constant, constant_throughput, events, task
from locust.contrib.fasthttp import FastHttpUser

log = logging.getLogger("loadtest")

MODEL = os.environ.get("LOADTEST_MODEL", "digits")
IMAGES_PER_REQUEST = int(os.environ.get("LOADTEST_IMAGES_PER_REQUEST", "4"))
TRITON_GRPC = os.environ.get("LOADTEST_TRITON_GRPC", "127.0.0.1:8001")
TRITON_KEY = os.environ.get("LOADTEST_TRITON_KEY", "")
USER_RPS = float(os.environ.get("LOADTEST_USER_RPS", "0") or 0)
ALLOW_REMOTE = os.environ.get("LOADTEST_ALLOW_REMOTE") == "1"


def wait_time_setting():
    """Back to back (closed loop, concurrency = users), or a fixed rate per user when LOADTEST_USER_RPS is set."""
    return constant_throughput(USER_RPS) if USER_RPS > 0 else constant(0)


def require_loopback(address: str) -> None:
    """Refuse to aim load at anything but this machine, unless LOADTEST_ALLOW_REMOTE=1."""
    targets.require_loopback(address, allow_remote=ALLOW_REMOTE)


def load_images() -> list[tuple[str, bytes, str]]:
    """(file name, bytes, media type) of every image in LOADTEST_IMAGES, making the sample photos if needed."""
    folder = Path(os.environ.get("LOADTEST_IMAGES", samples.DEFAULT_FOLDER))
    if not folder.is_dir() and "LOADTEST_IMAGES" not in os.environ:
        samples.write_samples(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LOADTEST_IMAGES={folder} is not a folder of images")
    paths = samples.image_files(folder)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(samples.IMAGE_SUFFIXES)}) in {folder}")
    return [(p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream") for p in paths]


def multipart_body(images: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one `image` field per image, and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data, media_type in images:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: {media_type}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class GatewayUser(FastHttpUser):
    """A client of the gateway: mostly single raw images, some multipart uploads, some several-image requests."""

    wait_time = wait_time_setting()
    path = f"/v1/models/{MODEL}/classify"

    def on_start(self) -> None:
        require_loopback(self.host or "")
        self.images = load_images()
        self.turn = 0

    def next_images(self, count: int) -> list[tuple[str, bytes, str]]:
        # Round robin rather than random: every run sends the same mix of sizes and formats.
        chosen = [self.images[(self.turn + i) % len(self.images)] for i in range(count)]
        self.turn += count
        return chosen

    def post(self, name: str, body: bytes, content_type: str, expected: int) -> None:
        with self.client.post(
            self.path, data=body, headers={"Content-Type": content_type}, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError):
                response.failure("answer is not the classify JSON")
                return
            if len(results) != expected:
                response.failure(f"{len(results)} results for {expected} images")

    @task(6)
    def classify_raw(self) -> None:
        ((_, data, media_type),) = self.next_images(1)
        self.post("classify raw", data, media_type, 1)

    @task(2)
    def classify_multipart(self) -> None:
        body, content_type = multipart_body(self.next_images(1))
        self.post("classify multipart", body, content_type, 1)

    @task(2)
    def classify_several(self) -> None:
        body, content_type = multipart_body(self.next_images(IMAGES_PER_REQUEST))
        self.post(f"classify multipart x{IMAGES_PER_REQUEST}", body, content_type, IMAGES_PER_REQUEST)


class TritonGrpcUser(User):
    """A client that preprocesses itself (the model's published spec) and calls Triton's gRPC endpoint."""

    wait_time = wait_time_setting()

    def on_start(self) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient

        from server.preprocess import preprocess_bytes
        from server.triton import REPOSITORY_KEY_HEADER, model_info_from_config

        require_loopback(TRITON_GRPC)
        self.grpc = grpcclient
        self.headers = {f"triton-grpc-protocol-{REPOSITORY_KEY_HEADER}": TRITON_KEY} if TRITON_KEY else None
        self.client = grpcclient.InferenceServerClient(TRITON_GRPC)
        config = self.client.get_model_config(MODEL, as_json=True, client_timeout=30)["config"]
        self.info = model_info_from_config(MODEL, config)
        self.tensors = [
            preprocess_bytes(data, self.info.spec, pixel_input=self.info.pixel_input) for _, data, _ in load_images()
        ]
        self.stack = np.stack
        self.turn = 0

    def on_stop(self) -> None:
        self.client.close()

    def infer(self, count: int) -> None:
        chosen = [self.tensors[(self.turn + i) % len(self.tensors)] for i in range(count)]
        self.turn += count
        batch = self.stack(chosen)
        tensor = self.grpc.InferInput(self.info.input_name, list(batch.shape), self.info.input_datatype)
        tensor.set_data_from_numpy(batch)
        outputs = [self.grpc.InferRequestedOutput(self.info.output_name)]
        started = time.perf_counter()
        error, length = None, 0
        try:
            result = self.client.infer(MODEL, [tensor], outputs=outputs, client_timeout=30, headers=self.headers)
            length = result.as_numpy(self.info.output_name).nbytes
        except Exception as e:  # every failure is a failed request in the statistics
            error = e
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"infer x{count}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task(3)
    def infer_one(self) -> None:
        self.infer(1)

    @task(1)
    def infer_several(self) -> None:
        self.infer(IMAGES_PER_REQUEST)


class SaturationRamp(LoadTestShape):
    """Adds users step by step and stops after the first step whose p99 is over the budget.

    Each step is judged on its own responses only, from `settle_s` after its users were added (new
    connections, the first run's cold caches) to its end; so the last step within budget is the
    saturation point. The first step also waits `warmup_s`. Steps go to LOADTEST_RAMP_OUT as JSON.
    """

    # Locust uses any shape class it finds; this one stays out of plain runs unless asked for.
    abstract = os.environ.get("LOADTEST_SHAPE") != "ramp"

    budget_ms = float(os.environ.get("LOADTEST_P99_BUDGET_MS", "250"))
    step_users = int(os.environ.get("LOADTEST_RAMP_STEP_USERS", "2"))
    step_s = float(os.environ.get("LOADTEST_RAMP_STEP_S", "15"))
    settle_s = float(os.environ.get("LOADTEST_RAMP_SETTLE_S", "2"))
    warmup_s = float(os.environ.get("LOADTEST_RAMP_WARMUP_S", "5"))
    max_users = int(os.environ.get("LOADTEST_RAMP_MAX_USERS", "64"))
    out_path = os.environ.get("LOADTEST_RAMP_OUT")

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []
        self.users = self.step_users
        self.step_changed = 0.0  # when the current user count was set
        self.measure_started: float | None = None
        self.snapshot: tuple[dict[int, int], int, int] | None = None
        self.done = False

    def _take_snapshot(self) -> tuple[dict[int, int], int, int]:
        total = self.runner.stats.total
        return dict(total.response_times), total.num_requests, total.num_failures

    def _close_step(self, now: float) -> dict:
        times, requests, failures = self._take_snapshot()
        before_times, before_requests, before_failures = self.snapshot
        seconds = max(now - self.measure_started, 1e-9)
        step = {
            "users": self.users,
            "seconds": round(seconds, 2),
            "requests": requests - before_requests,
            "failures": failures - before_failures,
            "rps": round((requests - before_requests) / seconds, 2),
            "p50_ms": step_percentile(before_times, times, 0.50),
            "p99_ms": step_percentile(before_times, times, 0.99),
        }
        step["within_budget"] = step["p99_ms"] is not None and step["p99_ms"] <= self.budget_ms
        self.steps.append(step)
        log.info("ramp step: %s", step)
        if self.out_path:
            Path(self.out_path).write_text(json.dumps({"budget_ms": self.budget_ms, "steps": self.steps}, indent=1))
        return step

    def tick(self):
        if self.done:
            return None
        now = self.get_run_time()
        settle = self.settle_s + (self.warmup_s if not self.steps else 0.0)
        if self.measure_started is None:
            if now - self.step_changed >= settle:
                self.measure_started, self.snapshot = now, self._take_snapshot()
        elif now - self.measure_started >= self.step_s:
            step = self._close_step(now)
            if not step["within_budget"] or self.users + self.step_users > self.max_users:
                self.done = True
                return None
            self.users += self.step_users
            self.step_changed, self.measure_started = now, None
        return self.users, max(self.step_users, 1)


@events.init.add_listener
def check_host(environment, **_) -> None:
    # Fail fast, before any user starts, when --host aims elsewhere than this machine.
    if environment.host:
        require_loopback(environment.host)
