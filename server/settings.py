"""Every gateway setting in one typed place, each overridable by a GATEWAY_* environment variable."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Every request allocates and frees several 600 KB buffers (the normalized image, the batch, the gRPC
# message). Above glibc's mmap threshold each one is a fresh mapping whose pages fault in again; kept
# on the heap they are reused. docker/gateway.Dockerfile sets the same; the environment overrides both.
GATEWAY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


class NoApiKeys(ValueError):
    """An API key source is set but yields no key."""


class SettingsError(ValueError):
    """A setting's environment variable holds a value its field refuses; the message is one line naming it."""


def load_settings(settings_type: type[SettingsT], **values) -> SettingsT:
    """`settings_type(**values)`, with pydantic's multi-line report turned into one line that names the
    environment variable a user set (GATEWAY_DRAIN_S, not drain_s) and the value it held."""
    try:
        return settings_type(**values)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        prefix = settings_type.model_config.get("env_prefix", "")
        name = prefix + "_".join(str(part) for part in first["loc"]).upper()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SettingsError(f"{name}={first.get('input')!r}: {first['msg']}{more}") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=None, extra="ignore")

    # Loopback unless told otherwise; the container and Kubernetes set 0.0.0.0 and expect API keys.
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)

    triton_protocol: Literal["grpc", "http"] = "grpc"
    # One endpoint, a comma-separated list of replicas, or dns:///name:port re-resolved (a headless Service).
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_timeout_s: float = Field(10.0, gt=0, description="per Triton call; past it the gateway answers 504")
    triton_repository_key: SecretStr | None = Field(None, description="header value for Triton's repository API")
    model_info_ttl_s: float = Field(5.0, ge=0, description="how long a model's config (spec, labels) is cached")

    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    # From the start of reading to the last byte; past it 408. A request holds no inference slot until
    # its body is in, so a slow client costs a connection, not capacity.
    body_timeout_s: float = Field(30.0, gt=0, description="to receive a request's body; past it 408")
    max_images_per_request: int = Field(32, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="checked before decoding (decompression bombs)")
    # Large JPEGs decode several times faster at reduced scale, with pixels ~0.6/255 off on average
    # (docs/results.md). auto: for the models whose config allows it (their top-1 measured both ways at
    # build time, `decode.reduced_scale`); off: never; on: for every model. true/false/1/0 mean on/off.
    jpeg_draft: Literal["auto", "off", "on"] = "auto"
    default_top_k: int = Field(5, ge=1)
    # Worker processes on the one port (server/serve.py); unset: one per core this process may run on, at most
    # 8. Each worker has its own Triton connections, shared-memory region and threads, and every limit
    # below (in flight, connections, buffered bytes, decodes) applies to each worker on its own.
    workers: int | None = Field(None, ge=1, le=64)
    max_in_flight: int = Field(64, gt=0, description="inference requests at once; past it 429 with Retry-After")
    # Background comparisons of a canary or a reference model (server/shadow.py); more are dropped and counted.
    shadow_concurrency: int = Field(4, ge=0, le=256, description="shadow requests at once per worker")
    preprocess_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    # A request alone in the gateway whose images are baseline JPEGs of at most these pixels and bytes
    # in all (by their headers) is preprocessed on the event loop, which has nothing else to do: handing
    # the work to a thread and back cost 0.15 to 0.7 ms more at concurrency 1 (docs/results.md). Requests
    # arriving meanwhile wait for it: about 4 ms for an 800x600 photo on a slow core, at most about
    # 0.15 s for a crafted file of the byte limit. Any other request goes to the thread pool. 0: never.
    inline_preprocess_max_pixels: int = Field(500_000, ge=0)
    inline_preprocess_max_bytes: int = Field(128 * 1024, ge=0)
    # Input tensors go through a /dev/shm region when Triton can map it (same host, or containers
    # sharing IPC), as bytes otherwise. Each slot holds one request's batch (2 MiB: three 224x224 float
    # images); the region is reserved in memory at start. 0 slots: always bytes.
    shared_memory_slots: int = Field(32, ge=0)
    shared_memory_slot_bytes: int = Field(2 * 1024 * 1024, gt=0)

    # Optional bearer tokens: comma-separated, or one per line in a file. Never logged.
    api_keys: SecretStr | None = None
    api_keys_file: str | None = None
    log_json: bool = True
    # With API keys set, /docs and /openapi.json, and /metrics, need one too unless these say otherwise:
    # the docs tell the API's shape, the metrics the served models and the traffic.
    docs_require_key: bool = True
    metrics_require_key: bool = True
    # Comma-separated models that /readyz waits for; empty: every model in the repository except those
    # that failed to load (a broken model does not hold the others' gateway out of service).
    required_models: str = ""

    @field_validator("jpeg_draft", mode="before")
    @classmethod
    def _jpeg_draft_spellings(cls, value: object) -> object:
        # The setting was a boolean before it followed the model: its spellings keep their meaning.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            lowered = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(lowered, lowered)
        return value

    def reduced_scale_decode(self, model_allows: bool) -> bool:
        """Whether a model's JPEGs are decoded at reduced scale: as its config says (`model_allows`), unless
        GATEWAY_JPEG_DRAFT overrides it."""
        return self.jpeg_draft == "on" or (self.jpeg_draft == "auto" and model_allows)

    def required_model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.required_models.split(",") if name.strip())

    # Bounds on decoding, where a small file can expand a thousandfold (a 190 KB PNG to 160 MB of pixels).
    # A request's images may hold this many pixels in all, by their headers; past it 413 before decoding.
    max_request_pixels: int = Field(100_000_000, gt=0)
    # A request whose images hold at least this many pixels in all is large: at most max_large_decodes of
    # them, of at most decode_pixel_budget pixels in all, are decoded at once; a request that would exceed
    # either is refused with 429 and Retry-After rather than wait in a thread. After one, freed memory goes
    # back to the system.
    large_image_pixels: int = Field(4_000_000, ge=0)
    decode_pixel_budget: int = Field(50_000_000, gt=0)
    # Default: one thread fewer than the cores, so that small requests always have one.
    max_large_decodes: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 1) - 1), gt=0)
    # How long a request may wait for a preprocessing thread; past it 429 with Retry-After.
    preprocess_wait_s: float = Field(2.0, gt=0)

    def load_api_keys(self) -> tuple[str, ...]:
        """The API keys; none when no key source is set. A source that is set but yields no key is an
        error (NoApiKeys), never a gateway open to all."""
        keys: list[str] = []
        if self.api_keys is not None:
            keys += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file:
            try:
                with open(self.api_keys_file) as f:
                    keys += f.read().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise NoApiKeys(f"GATEWAY_API_KEYS_FILE {self.api_keys_file}: cannot read it: {e}") from None
        keys = [k.strip() for k in keys if k.strip()]
        if not keys and (self.api_keys is not None or self.api_keys_file):
            source = f"GATEWAY_API_KEYS_FILE {self.api_keys_file}" if self.api_keys_file else "GATEWAY_API_KEYS"
            raise NoApiKeys(f"{source} holds no API key; set one or unset it to run without keys")
        return tuple(keys)

    @property
    def triton_url(self) -> str:
        return self.triton_grpc_url if self.triton_protocol == "grpc" else self.triton_http_url

    # Bytes of request bodies held in memory at once, across all requests (a compressed /v2 body's unpacked
    # bytes included): reserved as they arrive and kept until the request is answered; past it 429 with
    # Retry-After. Default: 4 x max_body_bytes.
    max_buffered_body_bytes: int | None = Field(None, gt=0)
    # Open connections (idle ones included) or requests at once before uvicorn answers 503 (its
    # limit_concurrency, passed where the gateway process starts). uvicorn has no deadline for headers.
    max_connections: int = Field(1024, gt=0)
    # After SIGTERM: /readyz answers 503 at once and new inference requests 503 with Retry-After for this
    # long, while requests already in flight complete; then the process stops (server/drain.py).
    drain_s: float = Field(5.0, ge=0, description="after SIGTERM, refuse new inference this long, then exit")

    # OpenTelemetry traces, one per request, sent with OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT (the SDK's
    # own OTEL_* variables set the endpoint, service name and sampler; see server/tracing.py). Off: no spans,
    # no exporter thread.
    tracing: bool = False

    def buffered_body_limit(self) -> int:
        return self.max_buffered_body_bytes or 4 * self.max_body_bytes


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


@lru_cache
def get_settings() -> Settings:
    return load_settings(Settings)
