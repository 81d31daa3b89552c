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
