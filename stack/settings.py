"""Settings of the local stack's embedded Triton server, each overridable by a TRITON_* variable."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class TritonSettings(BaseSettings):
    """The embedded Triton server of the local stack (`make serve`, `make demo`), TRITON_* variables."""

    model_config = SettingsConfigDict(env_prefix="TRITON_", env_file=None, extra="ignore")

    model_repository: str = "model_repository"
    host: str = "127.0.0.1"  # only the gateway is meant to be reachable
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    model_control_mode: Literal["none", "poll", "explicit"] = "poll"
    repository_poll_s: int = Field(2, ge=1)
    cache_dir: str = ".cache/triton"
    # Load/unload through Triton's repository API needs this header value; unset, the stack makes one
    # and keeps it in <cache_dir>/repository-api-key for `builder publish`.
    repository_api_key: SecretStr | None = None


class StackSettings(BaseSettings):
    """How `python -m stack` (make serve) supervises its processes, STACK_* variables."""

    model_config = SettingsConfigDict(env_prefix="STACK_", env_file=None, extra="ignore")

    # A process that exits unexpectedly is started again after restart_backoff_s, doubled for each earlier
    # crash within restart_window_s, at most restart_backoff_max_s; its max_crashes-th crash within the
    # window stops the stack with an error instead.
    restart_backoff_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(30.0, gt=0)
    max_crashes: int = Field(5, ge=1)
    restart_window_s: float = Field(120.0, gt=0)
    # Triton servers on the repository, the gateway routing over them; the first on TRITON_*_PORT, the others
    # on free ports, each supervised on its own.
    triton_replicas: int = Field(1, ge=1, le=8)
    # stack_process_restarts_total{process=...} in Prometheus's format at http://<host>:<port>/metrics;
    # port 0: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(8003, ge=0, le=65535)
