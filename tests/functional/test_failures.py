"""The stack under failure: Triton gone, a broken model beside a good one, a new version while serving."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from builder.publish import publish
from stack.launcher import LaunchError, TritonServer, free_port

from .conftest import MODEL, QuickStopTriton, gateway_regions, metric, start_gateway, start_triton


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "PNG")
    return buffer.getvalue()


def post_png(url: str, model: str = MODEL) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{model}/classify", content=png(), headers={"Content-Type": "image/png"}, timeout=30
    )


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_triton_down_gives_503_with_retry_after_and_the_gateway_recovers_when_it_is_back(repository, tmp_path):
    grpc_port = free_port()
    gateway = start_gateway(f"127.0.0.1:{grpc_port}", tmp_path / "gateway.log")
    try:
        started = time.monotonic()
        response = post_png(gateway.url)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "triton_unavailable"
        assert time.monotonic() - started < 10
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 503

        triton = QuickStopTriton(
            model_repository=repository,
            http_port=free_port(),
            grpc_port=grpc_port,
            metrics_port=free_port(),
            cache_dir=tmp_path / "cache",
        )
        with triton:
            assert wait_for(lambda: post_png(gateway.url).status_code == 200)
            assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
            # Triton came up after the gateway: a probe offers it the region for input tensors.
            assert wait_for(lambda: gateway_regions(triton.grpc_url, gateway))
            sent = metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory") or 0
            assert post_png(gateway.url).status_code == 200
            assert metric(gateway.url, "gateway_triton_inputs_total", transport="shared_memory") == sent + 1
    finally:
        gateway.stop()


def test_a_broken_model_does_not_take_the_good_one_down(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    publish(tiny_run / "model.onnx", repository, MODEL)
    publish(tiny_run / "model.onnx", repository, "broken")
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"corrupted")
    triton = start_triton(repository, tmp_path / "cache")
    gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log")
    try:
        assert post_png(gateway.url).status_code == 200
        # Ready once the broken model has failed to load: it is not one the gateway can serve.
        assert wait_for(lambda: httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200, 90)
        # In the repository but not loaded: unavailable for now (503), not absent (404).
        broken = post_png(gateway.url, "broken")
        assert broken.status_code == 503 and broken.headers["Retry-After"]
        assert broken.json()["error"]["code"] == "triton_unavailable" and "broken" in broken.json()["error"]["message"]
    finally:
        gateway.stop()
        triton.stop()


def test_a_version_published_while_triton_polls_is_served_without_restart(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    publish(tiny_run / "model.onnx", repository, MODEL)
    triton = start_triton(repository, tmp_path / "cache")
    gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log")
    try:
        assert post_png(gateway.url).json()["version"] == "1"
        publish(tiny_run / "model.onnx", repository, MODEL)
        assert wait_for(lambda: post_png(gateway.url).json().get("version") == "2")
        failed = [line for line in triton.log_tail(400).splitlines() if "failed to load" in line]
        assert not failed, failed
    finally:
        gateway.stop()
        triton.stop()


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving_and_is_reported(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    publish(tiny_run / "model.onnx", repository, MODEL)
    triton = start_triton(repository, tmp_path / "cache")
    gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log", triton.http_url)
    try:
        assert post_png(gateway.url).json()["version"] == "1"
        # Version 2 whole at once, as the builder publishes, with a model file Triton cannot load.
        staging = repository / MODEL / ".staging-2"
        shutil.copytree(repository / MODEL / "1", staging)
        (staging / "model.onnx").write_bytes(b"not an ONNX model")
        staging.rename(repository / MODEL / "2")

        def version_2() -> dict:
            (model,) = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["models"]
            return next((v for v in model["versions"] if v["version"] == "2"), {})

        assert wait_for(lambda: version_2().get("state") == "UNAVAILABLE" and version_2().get("reason"), 90), (
            triton.log_tail()
        )
        assert post_png(gateway.url).json()["version"] == "1"
        # Counted from the index that /v1/models just read. Triton goes on listing the failed version, with
        # its reason, after it is removed from the repository; the gauge follows the index.
        assert metric(gateway.url, "gateway_model_versions_unavailable", model=MODEL) == 1
    finally:
        gateway.stop()
        triton.stop()


def test_launcher_refuses_a_missing_repository(tmp_path):
    with pytest.raises(LaunchError, match="not a directory"):
        TritonServer(model_repository=tmp_path / "missing", cache_dir=tmp_path).start()


def _descendants(pid: int) -> set[int]:
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        for child in map(int, children):
            found.add(child)
            frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to list child processes")
def test_serve_stops_triton_and_the_gateway_on_ctrl_c_with_no_orphans(repository, tmp_path):
    gateway_port = free_port()
    env = {
        **os.environ,
        "TRITON_HTTP_PORT": str(free_port()),
        "TRITON_GRPC_PORT": str(free_port()),
        "TRITON_METRICS_PORT": str(free_port()),
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_HOST": "127.0.0.1",
    }
    serve = subprocess.Popen(
        [sys.executable, "-m", "stack", "--repository", str(repository)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: _ok(f"http://127.0.0.1:{gateway_port}/v1/models/{MODEL}/classify"), 90)
        children = _descendants(serve.pid)
        assert len(children) >= 3  # tritonserver, its Python-backend stub, the gateway
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        assert wait_for(lambda: not any(_alive(pid) for pid in children), 15)
    finally:
        if serve.poll() is None:
            serve.kill()


def _ok(url: str) -> bool:
    try:
        return post_png(url.rsplit("/v1/", 1)[0]).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_unloaded_model_is_503_then_served_again_once_reloaded(repository, tmp_path):
    key = "k3y"
    triton = start_triton(
        repository,
        tmp_path / "cache",
        model_control_mode="explicit",
        repository_api_key=key,
        extra_args=("--load-model=*",),
    )
    gateway = start_gateway(triton.grpc_url, tmp_path / "gateway.log", GATEWAY_TRITON_REPOSITORY_KEY=key)
    control = f"http://{triton.http_url}/v2/repository/models/{MODEL}"
    try:
        assert post_png(gateway.url).status_code == 200
        assert httpx.post(f"{control}/unload", headers={"repository-key": key}, timeout=30).status_code == 200
        unloaded = post_png(gateway.url)
        assert unloaded.status_code == 503 and unloaded.headers["Retry-After"]
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 503
        assert post_png(gateway.url, "never-existed").status_code == 404
        assert httpx.post(f"{control}/load", headers={"repository-key": key}, timeout=60).status_code == 200
        assert wait_for(lambda: post_png(gateway.url).status_code == 200)
    finally:
        gateway.stop()
        triton.stop()
