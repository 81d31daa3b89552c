"""The gateway's one connection to Triton: tritonclient's asyncio client, gRPC or HTTP.

Results come back as plain Python and NumPy; tritonclient's errors are translated here into the
gateway's own (`server.errors`), so routes never see a foreign exception.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
from opentelemetry.trace import Tracer
from tritonclient.utils import InferenceServerException

from .degrade import Degrade
from .degrade import parse as parse_degrade
from .errors import (
    RETRY_AFTER_S,
    BadRequest,
    GatewayError,
    ModelNotFound,
    TooManyRequests,
    TritonFailed,
    TritonTimeout,
    TritonUnavailable,
)
from .preprocess import ENCODED_INPUT_DIMS, PIXEL_DATATYPE, PreprocessSpec, allows_reduced_scale
from .rollout import PARAMETER_PREFIX as ROLLOUT_PREFIX
from .rollout import STABLE, Reference, Rollout, version_of
from .shared_memory import REGION_PREFIX, InputRegion, Slot, region_exists
from .tracing import client_span, with_trace_context

T = TypeVar("T")
log = logging.getLogger(__name__)

# The header that carries the key of Triton's restricted APIs (the local stack starts Triton with it).
REPOSITORY_KEY_HEADER = "repository-key"


class Inference(NamedTuple):
    logits: np.ndarray
    version: str  # the version that answered
    transport: str  # how the input reached Triton: "shared_memory" or "bytes"


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to serve a model, read from its config.pbtxt through Triton."""

    name: str
    spec: PreprocessSpec
    labels: tuple[str, ...]
    input_name: str
    output_name: str
    max_batch_size: int
    # The model takes N x H x W x C uint8 pixels and normalizes them itself (`builder publish --pixel-input`).
    pixel_input: bool = False
    # The model takes the encoded image bytes and decodes them itself (`builder publish --preprocess gpu`).
    encoded_input: bool = False
    # Triton's response cache is on: inputs go as bytes (see server/shared_memory.py).
    response_cache: bool = False
    # A model without batching (max_batch_size 0) whose input dims fix the batch axis: images per call.
    fixed_batch: int = 0
    # A canary rollout under way (`builder rollout`): which versions share the requests, and how.
    rollout: Rollout | None = None
    # The versions a `specific` version policy names (what a promoted or aborted rollout leaves); empty for
    # the other policies.
    specific_versions: tuple[int, ...] = ()
    # A model to compare this one's answers with, on a share of requests (server/shadow.py).
    reference: Reference | None = None
    # Under overload, a faster model of the family answers (`builder degrade`; server/degrade.py).
    degrade: Degrade | None = None
    # Its accuracy was measured with JPEGs decoded at reduced scale, and stayed within the budget.
    reduced_scale_decode: bool = False

    @property
    def images_per_call(self) -> int | None:
        """The most images one inference call may carry; None: any number."""
        return self.max_batch_size or self.fixed_batch or None

    @property
    def input_datatype(self) -> str:
        return PIXEL_DATATYPE if self.pixel_input or self.encoded_input else "FP32"

    def public(self) -> dict[str, Any]:
        return {
            "preprocessing": self.spec.to_dict(),
            "labels": list(self.labels),
            "input": self.input_name,
            "input_datatype": self.input_datatype,
            "output": self.output_name,
            "max_batch_size": self.max_batch_size,
            "rollout": dataclasses.asdict(self.rollout) if self.rollout else None,
            "degrade": dataclasses.asdict(self.degrade) if self.degrade else None,
        }


def translate_error(error: Exception, model: str | None = None) -> GatewayError:
    """tritonclient's and the transports' exceptions -> the gateway's errors."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, asyncio.TimeoutError):
        return TritonTimeout("Triton did not answer in time", retry_after_s=RETRY_AFTER_S)
    message = str(error.message() if isinstance(error, InferenceServerException) else error)
    status = str(error.status() or "") if isinstance(error, InferenceServerException) else ""
    lowered = message.lower()
    if "maximum queue size" in lowered:
        return TooManyRequests(f"model {model!r} is at capacity; retry shortly", retry_after_s=RETRY_AFTER_S)
    if "unknown model" in lowered or "not found" in lowered or "NOT_FOUND" in status:
        return ModelNotFound(f"model {model!r} is not served" if model else message)
    if "is not ready" in lowered or "unavailable" in lowered or "not ready" in lowered:
        if "DEADLINE" in status:
            return TritonTimeout("Triton did not answer in time", retry_after_s=RETRY_AFTER_S)
        return TritonUnavailable(f"Triton or model {model!r} is unavailable", retry_after_s=RETRY_AFTER_S)
    if "DEADLINE_EXCEEDED" in status or "deadline exceeded" in lowered or "timeout" in lowered:
        return TritonTimeout("Triton did not answer in time", retry_after_s=RETRY_AFTER_S)
    if isinstance(error, (OSError, ConnectionError)) or "connect" in lowered or "UNAVAILABLE" in status:
        return TritonUnavailable("Triton is unreachable", retry_after_s=RETRY_AFTER_S)
    # Triton's own input checks and a model's refusal (TritonError.INVALID_ARG in the Python backend) come
    # as gRPC INVALID_ARGUMENT or HTTP 400; HTTP's unknown-model 400 was handled above.
    if "INVALID_ARGUMENT" in status or status == "400":
        return BadRequest(f"the model refused the input: {message.splitlines()[0]}")
    return TritonFailed(f"Triton error: {message.splitlines()[0] if message else type(error).__name__}")


def _fixed_batch(config: dict) -> int:
    if int(config.get("max_batch_size", 0)) > 0:
        return 0
    dims = config["input"][0].get("dims", [])
    return max(int(dims[0]), 0) if dims else 0  # -1: a dynamic first axis, any number of images


def _takes_encoded_images(tensor: dict) -> bool:
    """A UINT8 input of dims [-1] (protobuf's JSON writes them as strings) takes encoded image bytes."""
    dims = tuple(int(d) for d in tensor.get("dims", []))
    return tensor.get("data_type") == f"TYPE_{PIXEL_DATATYPE}" and dims == ENCODED_INPUT_DIMS


def model_info_from_config(name: str, config: dict) -> ModelInfo:
    """A model's config, as Triton's model-config API returns it in JSON, -> what serving it needs."""
    parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    rollout, fallback = _rollout(name, parameters)
    try:
        encoded = _takes_encoded_images(config["input"][0])
        return ModelInfo(
            name=name,
            spec=PreprocessSpec.from_parameters(parameters),
            labels=tuple(json.loads(parameters.get("labels", "[]"))),
            input_name=config["input"][0]["name"],
            output_name=config["output"][0]["name"],
            max_batch_size=int(config.get("max_batch_size", 0)),
            pixel_input=config["input"][0].get("data_type") == f"TYPE_{PIXEL_DATATYPE}" and not encoded,
            encoded_input=encoded,
            response_cache=bool(config.get("response_cache", {}).get("enable", False)),
            fixed_batch=_fixed_batch(config),
            rollout=rollout,
            reference=_reference(name, parameters),
            degrade=parse_degrade(name, parameters),
            reduced_scale_decode=allows_reduced_scale(parameters),
            # Protobuf's JSON writes int64 as strings.
            # An unreadable rollout's stable version stands for the policy (server/shadow.py routes to it).
            specific_versions=(fallback,)
            if fallback
            else tuple(int(v) for v in config.get("version_policy", {}).get("specific", {}).get("versions", [])),
        )
    except (KeyError, ValueError, IndexError) as e:
        raise TritonFailed(f"model {name!r} has no usable preprocessing spec in its config: {e}") from e


# (model, its rollout parameters) already logged as unreadable: a config is read again every TTL.
_unreadable_rollouts: set[tuple[str, frozenset[tuple[str, str]]]] = set()


def _rollout(name: str, parameters: dict[str, str]) -> tuple[Rollout | None, int | None]:
    """The rollout, and the version to serve alone where it cannot be read but names its stable version."""
    try:
        return Rollout.from_parameters(parameters), None
    except (KeyError, ValueError) as e:
        # A hand-edited rollout the gateway cannot follow: its stable version serves everything (the newest
        # version, the canary, would otherwise get every request with no guard rail); without one, Triton's
        # own choice (its newest loaded version) keeps the model serving.
        stable = version_of(parameters, STABLE)
        key = (name, frozenset((k, v) for k, v in parameters.items() if k.startswith(ROLLOUT_PREFIX)))
        if key not in _unreadable_rollouts:
            _unreadable_rollouts.add(key)
            then = f"version {stable} serves every request" if stable else "Triton chooses the version"
            log.warning("model %r: ignoring its rollout parameters (%s): %s", name, e, then)
        return None, stable


def _reference(name: str, parameters: dict[str, str]) -> Reference | None:
    try:
        return Reference.from_parameters(parameters)
    except ValueError as e:
        log.warning("model %r: ignoring its reference parameters: %s", name, e)
        return None


# gRPC waits up to 120 s between attempts to reconnect to a server that went away (its connection
# back-off spec); Triton restarted by the local stack or Kubernetes is back in seconds, and the gateway
# should be too. Attempts to a down Triton every 2 s cost nothing worth saving.
MAX_RECONNECT_BACKOFF_MS = 2000


def grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options (message sizes, keepalive), plus a short reconnect back-off.
    tritonclient drops its defaults when given any channel arguments, so they are restated from its API."""
    from tritonclient.grpc.aio import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


class TritonClient:
    """Async access to one Triton server, with model configs cached for `info_ttl_s`."""

    def __init__(
        self,
        url: str,
        *,
        protocol: str = "grpc",
        timeout_s: float = 10.0,
        info_ttl_s: float = 5.0,
        repository_key: str | None = None,
        region: InputRegion | None = None,
        tracer: Tracer | None = None,
    ):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        self.url, self.protocol, self.info_ttl_s = url, protocol, info_ttl_s
        # Triton restricts its repository API (the index included), its shared-memory API and inference
        # to callers that carry this header. Over gRPC, Triton expects the header name with its own prefix.
        header = REPOSITORY_KEY_HEADER if protocol == "http" else f"triton-grpc-protocol-{REPOSITORY_KEY_HEADER}"
        self._restricted_headers = {header: repository_key} if repository_key else None
        # The transport enforces the timeout (a gRPC deadline on every call, aiohttp's total timeout over
        # HTTP): asyncio.wait_for would wrap each inference in one more task and event-loop trip.
        if protocol == "grpc":
            import tritonclient.grpc.aio as client_module

            self._client = client_module.InferenceServerClient(url, channel_args=grpc_channel_args())
            self._timeout: dict[str, float] = {"client_timeout": timeout_s}
        else:
            import tritonclient.http.aio as client_module

            self._client = client_module.InferenceServerClient(url, conn_timeout=timeout_s)
            self._timeout = {}
        self._module = client_module
        self.tracer = tracer  # None: tracing is off
        self._info: dict[str, tuple[float, ModelInfo]] = {}
        self.region = region
        # Registered: inputs in the region can be sent by reference. Refused: this Triton cannot map it
        # (another host, another /dev/shm); asked again only after Triton was seen down and back.
        self.region_registered = self.region_refused = False

    async def close(self) -> None:
        if self.region is not None:
            # Even when no registration is known: one whose answer was lost would pin the memory in Triton.
            # Triton accepts unregistering a name it does not have.
            try:
                await asyncio.wait_for(
                    self._client.unregister_system_shared_memory(self.region.name, headers=self._restricted_headers),
                    2.0,
                )
            except Exception:
                pass  # Triton is gone, and our registration with it
            self.region_registered = False
        await self._client.close()

    async def register_region(self) -> None:
        """Register the input region with Triton, unless it is already, or was refused since `forget_region`."""
        region = self.region
        if region is None or self.region_registered or self.region_refused:
            return
        try:
            await self._client.register_system_shared_memory(
                region.name, region.key, region.size, headers=self._restricted_headers, **self._timeout
            )
        except Exception as e:
            message = str(e)
            if "already in manager" in message:  # registered before an answer that got lost: still ours
                self.region_registered = True
                return
            # Refused for good: Triton cannot open the key (another host, another /dev/shm), or only
            # other callers may register. Anything else (unreachable, a timeout) is tried again by the
            # next probe.
            self.region_refused = "unable to open shared memory region" in message.lower() or "restricted" in message
            if self.region_refused:
                log.warning(
                    "Triton at %s cannot use shared memory region %s, input tensors go as bytes: %s",
                    self.url,
                    region.name,
                    message,
                )
            return
        self.region_registered = True
        log.info("Triton at %s reads input tensors from shared memory region %s", self.url, region.name)
        await self._drop_stale_regions(region)

    async def _drop_stale_regions(self, own: InputRegion) -> None:
        """Unregister gateway regions whose name is gone from /dev/shm (their gateway was killed): Triton
        would keep them mapped for ever. Runs once Triton has opened our own key, so /dev/shm is shared."""
        try:
            if self.protocol == "grpc":
                status = await self._client.get_system_shared_memory_status(
                    headers=self._restricted_headers, as_json=True, **self._timeout
                )
                regions = list(status.get("regions", {}).values())
            else:
                regions = await self._client.get_system_shared_memory_status(headers=self._restricted_headers)
            for entry in regions:
                name, key = entry.get("name", ""), entry.get("key", "")
                if name.startswith(REGION_PREFIX) and name != own.name and not region_exists(key):
                    await self._client.unregister_system_shared_memory(
                        name, headers=self._restricted_headers, **self._timeout
                    )
                    log.info("unregistered stale shared memory region %s from Triton at %s", name, self.url)
        except Exception as e:
            log.warning("could not clear stale shared memory regions from Triton at %s: %s", self.url, e)

    def forget_region(self) -> None:
        """Triton was down: a restarted server has lost the registration, and may now accept it."""
        self.region_registered = self.region_refused = False

    async def _call(self, call: Awaitable[T], model: str | None = None) -> T:
        try:
            return await call
        except Exception as e:  # every failure leaves here as a GatewayError
            raise translate_error(e, model) from e

    async def server_ready(self) -> bool:
        try:
            return bool(await self._call(self._client.is_server_ready(**self._timeout)))
        except GatewayError:
            return False

    async def repository_index(self) -> list[dict[str, str]]:
        """Every model Triton knows of, one entry per version: name, version, state, reason."""
        if self.protocol == "grpc":
            index = await self._call(
                self._client.get_model_repository_index(headers=self._restricted_headers, as_json=True, **self._timeout)
            )
            entries = index.get("models", [])
        else:
            entries = await self._call(self._client.get_model_repository_index(headers=self._restricted_headers))
        return [
            {
                "name": e.get("name", ""),
                "version": str(e.get("version", "")),
                "state": e.get("state", ""),
                "reason": e.get("reason", ""),
            }
            for e in entries
        ]

    async def model_config(self, name: str) -> dict:
        try:
            if self.protocol == "grpc":
                config = self._client.get_model_config(name, as_json=True, **self._timeout)
                return (await self._call(config, name))["config"]
            return await self._call(self._client.get_model_config(name), name)
        except ModelNotFound:
            raise await self._absent_or_unavailable(name, "") from None

    async def _absent_or_unavailable(self, name: str, version: str) -> GatewayError:
        """Triton says "unknown model" both for a name it never had and for an unloaded model: a model
        (or version) still in the repository is unavailable for now (503), anything else is absent (404)."""
        try:
            index = await self.repository_index()
        except GatewayError:
            index = []
        known = [e for e in index if e["name"] == name and (not version or e["version"] == version)]
        if known:
            self._info.pop(name, None)
            return TritonUnavailable(
                f"model {name!r} is not ready (state {known[0]['state']})", retry_after_s=RETRY_AFTER_S
            )
        # A server on its way down unloads every model first: that is an outage, not an absent model,
        # and it lets a pool of replicas fail over instead of answering 404.
        if not await self.server_ready():
            return TritonUnavailable("Triton is not ready", retry_after_s=RETRY_AFTER_S)
        what = f"version {version} of model {name!r}" if version else f"model {name!r}"
        return ModelNotFound(f"{what} is not served")

    def forget_model_info(self, name: str) -> None:
        """Read the model's config again on its next use (its rollout may have moved on)."""
        self._info.pop(name, None)

    async def model_info(self, name: str) -> ModelInfo:
        cached = self._info.get(name)
        if cached and time.monotonic() - cached[0] < self.info_ttl_s:
            return cached[1]
        info = model_info_from_config(name, await self.model_config(name))
        self._info[name] = (time.monotonic(), info)
        return info

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot: Slot | None = None) -> Inference:
        """Logits for an N x C x H x W batch, split into chunks of the model's max batch size.

        With `slot` (holding `batch` at its start) and the region registered, Triton reads the tensors
        from shared memory; otherwise they travel as bytes.
        """
        offset = slot.offset if slot is not None and self.region_registered and not info.response_cache else None
        step = info.images_per_call or len(batch)
        if len(batch) <= step:
            return await self._infer_one(info, batch, version, offset)
        chunk_bytes = batch[:step].nbytes
        calls = [
            asyncio.ensure_future(
                self._infer_one(
                    info, batch[i : i + step], version, None if offset is None else offset + n * chunk_bytes
                )
            )
            for n, i in enumerate(range(0, len(batch), step))
        ]
        try:
            results = await asyncio.gather(*calls)
        except BaseException:
            for call in calls:  # the slot is about to be freed: no call may still read it
                call.cancel()
            raise
        transport = "bytes" if any(r.transport == "bytes" for r in results) else "shared_memory"
        return Inference(np.concatenate([r.logits for r in results]), results[0].version, transport)

    async def _infer_one(self, info: ModelInfo, batch: np.ndarray, version: str, offset: int | None) -> Inference:
        if self.tracer is None:
            return await self._send(info, batch, version, offset, self._restricted_headers)
        attributes = {
            "triton.model.name": info.name,
            "triton.model.version": version,
            "triton.batch_size": len(batch),
            "triton.input": "bytes" if offset is None else "shared_memory",
            "triton.protocol": self.protocol,
            "triton.url": self.url,
        }
        with client_span(self.tracer, "triton.infer", attributes) as span:
            # Triton continues the trace from the W3C traceparent in a call's headers (gRPC metadata or HTTP
            # headers), when started with --trace-config mode=opentelemetry: docs/user_guide/trace.md in
            # triton-inference-server/server, "OpenTelemetry Context Propagation".
            headers = with_trace_context(self._restricted_headers)
            inference = await self._send(info, batch, version, offset, headers)
            span.set_attribute("triton.model.version", inference.version)
            return inference

    async def _send(
        self, info: ModelInfo, batch: np.ndarray, version: str, offset: int | None, headers: dict[str, str] | None
    ) -> Inference:
        # An offset is only given while the region is registered, so the region is there too.
        region = self.region if offset is not None else None
        tensor = self._module.InferInput(info.input_name, list(batch.shape), info.input_datatype)
        if self.protocol == "grpc":
            output = self._module.InferRequestedOutput(info.output_name)
            if region is None:
                tensor.set_data_from_numpy(batch)
        else:
            output = self._module.InferRequestedOutput(info.output_name, binary_data=True)
            if region is None:
                tensor.set_data_from_numpy(batch, binary_data=True)
        if region is not None:
            tensor.set_shared_memory(region.name, batch.nbytes, offset)
        try:
            result = await self._client.infer(
                info.name,
                [tensor],
                model_version=version,
                outputs=[output],
                headers=headers,
                **self._timeout,
            )
        except Exception as e:
            if region is not None and f"unable to find shared memory region: '{region.name}'" in str(e).lower():
                # Triton restarted between two probes and lost the registration: register again for
                # the next requests, and send this one as bytes.
                log.warning("Triton at %s lost shared memory region %s", self.url, region.name)
                self.forget_region()
                await self.register_region()
                return await self._infer_one(info, batch, version, None)
            error = translate_error(e, info.name)
            if isinstance(error, ModelNotFound):
                raise await self._absent_or_unavailable(info.name, version) from e
            raise error from e
        response = result.get_response()
        # gRPC gives the protobuf message (read its field: converting it to JSON costs a millisecond),
        # HTTP a dict.
        served = response.model_version if self.protocol == "grpc" else response.get("model_version", "")
        return Inference(
            result.as_numpy(info.output_name), str(served or version), "bytes" if offset is None else "shared_memory"
        )

    async def statistics(self, name: str) -> dict:
        if self.protocol == "grpc":
            statistics = self._client.get_inference_statistics(name, as_json=True, **self._timeout)
            return await self._call(statistics, name)
        return await self._call(self._client.get_inference_statistics(name), name)
