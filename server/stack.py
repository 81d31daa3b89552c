"""The local stack: the embedded Triton server and the gateway in front of it, started and stopped together."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from .launcher import GatewayProcess, TritonServer
from .settings import TritonSettings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_stack(
    triton_settings: TritonSettings, *, gateway_host: str = "127.0.0.1", gateway_port: int = 8080,
) -> Iterator[tuple[TritonServer, GatewayProcess]]:
    """Triton on the repository, then the gateway pointed at its gRPC port; both stopped on exit."""
    cache_dir = Path(triton_settings.cache_dir)
    triton = TritonServer(
        model_repository=Path(triton_settings.model_repository),
        host=triton_settings.host,
        http_port=triton_settings.http_port,
        grpc_port=triton_settings.grpc_port,
        metrics_port=triton_settings.metrics_port,
        model_control_mode=triton_settings.model_control_mode,
        repository_poll_s=triton_settings.repository_poll_s,
        cache_dir=cache_dir,
    )
    gateway = GatewayProcess(
        host=gateway_host,
        port=gateway_port,
        env={"GATEWAY_TRITON_PROTOCOL": "grpc", "GATEWAY_TRITON_GRPC_URL": triton.grpc_url,
             "GATEWAY_TRITON_HTTP_URL": triton.http_url},
        log_path=cache_dir / "gateway.log",
    )
    with triton, gateway:
        yield triton, gateway
