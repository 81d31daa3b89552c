"""The local stack: the embedded Triton server and the gateway in front of it, started and stopped together."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .launcher import GatewayProcess, TritonServer
from .settings import TritonSettings

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


@contextlib.contextmanager
def local_stack(
    triton_settings: TritonSettings,
    *,
    gateway_host: str = "127.0.0.1",
    gateway_port: int = 8080,
) -> Iterator[tuple[TritonServer, GatewayProcess]]:
    """Triton on the repository, then the gateway pointed at its gRPC port; both stopped on exit."""
    cache_dir = Path(triton_settings.cache_dir)
    key = triton_settings.repository_api_key
    triton = TritonServer(
        model_repository=Path(triton_settings.model_repository),
        host=triton_settings.host,
        http_port=triton_settings.http_port,
        grpc_port=triton_settings.grpc_port,
        metrics_port=triton_settings.metrics_port,
        model_control_mode=triton_settings.model_control_mode,
        repository_poll_s=triton_settings.repository_poll_s,
        cache_dir=cache_dir,
        repository_api_key=key.get_secret_value() if key else repository_api_key(cache_dir),
    )
    gateway = GatewayProcess(
        host=gateway_host,
        port=gateway_port,
        env={
            "GATEWAY_TRITON_PROTOCOL": "grpc",
            "GATEWAY_TRITON_GRPC_URL": triton.grpc_url,
            "GATEWAY_TRITON_HTTP_URL": triton.http_url,
            "GATEWAY_TRITON_REPOSITORY_KEY": triton.repository_api_key or "",
        },
        log_path=cache_dir / "gateway.log",
    )
    with triton, gateway:
        yield triton, gateway
