"""The real stack on loopback: tritonserver from the nvidia-pytriton wheel and the gateway under uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from builder.publish import PublishSettings, publish
from stack.launcher import GatewayProcess, TritonServer, free_port
from tests.fixtures import tiny_run  # noqa: F401  (the trained model every published repository here serves)

MODEL = "digits"
PIXEL_MODEL = "digits-pixels"  # the same model, published to take 8-bit pixels


@pytest.fixture(scope="session", autouse=True)
def real_stack_tests_in_one_process(tmp_path_factory) -> None:
    """Under pytest-xdist, the first process to run a test here claims them all; another one fails its tests.

    Two processes starting Triton servers at the same moments cannot tell their Python backends' scratch
    folders apart and take each other's free ports (see tests/conftest.py). The grouping that prevents it
    breaks without a sound: pytest 9.2 ignores the group xdist 3.8 writes into node ids (pytest-xdist
    issue 1386), which is why pyproject.toml holds pytest below 9.2."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    run_folder = tmp_path_factory.getbasetemp().parent  # one per pytest run, shared by its processes
    claim = run_folder / "real-stack-process"
    written = run_folder / f"real-stack-process.{worker}"
    written.write_text(worker)
    try:
        os.link(written, claim)  # atomic: exactly one process creates the claim, whole
    except FileExistsError:
        owner = claim.read_text()
        if owner != worker:
            pytest.fail(
                f"real-stack tests run in two pytest-xdist processes ({owner} and {worker}): "
                "--dist loadgroup is not keeping the xdist_group 'servers' together",
                pytrace=False,
            )


class QuickStopTriton(TritonServer):
    """Triton as the stack runs it, killed half a second after SIGTERM when a test is done with it. A clean
    exit takes 2 to 4 s (it unloads each model and checks on them once a second), which tests of something
    else need not wait for; what it leaves behind is removed all the same (`stop`), and the tests of
    stopping (test_stack_supervision.py, test_failures.py) stop it the stack's way."""

    @property
    def stop_timeout_s(self) -> float:
        return 0.5


def start_triton(repository: Path, cache_dir: Path, **kwargs) -> TritonServer:
    server = QuickStopTriton(
        model_repository=repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        cache_dir=cache_dir,
        repository_poll_s=1,
        **kwargs,
    )
    server.start()
    return server


def start_gateway(triton_grpc_url: str, log_path: Path, http_url: str | None = None, **env: str) -> GatewayProcess:
    gateway = GatewayProcess(
        port=free_port(),
        log_path=log_path,
        env={
            "GATEWAY_TRITON_GRPC_URL": triton_grpc_url,
            "GATEWAY_TRITON_TIMEOUT_S": "5",
            "GATEWAY_TRITON_HTTP_URL": http_url or f"127.0.0.1:{free_port()}",
            "GATEWAY_MODEL_INFO_TTL_S": "0.5",
            **env,
        },
    )
    gateway.start()
    return gateway


@pytest.fixture(scope="session")
def repository(tiny_run, tmp_path_factory) -> Path:  # noqa: F811  (tiny_run: the fixture imported above)
    repository = tmp_path_factory.mktemp("model_repository")
    # Spinning on here, off (the default) in test_int8_serving: both ways of configuring ONNX Runtime load.
    # Two instances (the default) here, one on every core for the pixel model: both thread layouts load.
    # At most 4 images per call for the pixel model: the gateway splits a request of more into several.
    publish(tiny_run / "model.onnx", repository, MODEL, settings=PublishSettings(intra_op_spinning=True))
    publish(
        tiny_run / "model.onnx",
        repository,
        PIXEL_MODEL,
        settings=PublishSettings(pixel_input=True, instance_count=1, max_batch_size=4),
    )
    return repository


@pytest.fixture(scope="session")
def triton(repository, tmp_path_factory):
    server = start_triton(repository, tmp_path_factory.mktemp("triton-cache"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    process = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log", triton.http_url)
    yield process
    process.stop()


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of the gateway's /metrics, or None when it is not exported."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return None


def gateway_regions(triton_grpc_url: str, gateway: GatewayProcess) -> list[str]:
    """The shared-memory regions this gateway has registered with this Triton."""
    with grpcclient.InferenceServerClient(triton_grpc_url) as client:
        status = client.get_system_shared_memory_status(as_json=True)
    return [name for name in status.get("regions", {}) if name.startswith(f"gateway-{gateway.pid}-")]
