"""HTTP routes: health, models, classification, and the KServe v2 pass-through to Triton.

A classification reads as: read the images -> look up the model's spec -> decode and preprocess (in
the preprocessing threads, or on the event loop for a small JPEG alone in the gateway) -> one Triton
call -> softmax and top-k -> JSON. What a route needs from the app comes in through `server.deps`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from . import degrade, tracing
from .deps import (
    CanaryWatchDep,
    DecodeBudgetDep,
    DrainDep,
    InferenceSlotsDep,
    InputRegionDep,
    MetricsDep,
    PreprocessExecutorDep,
    ReplicasDep,
    RequestContextDep,
    SettingsDep,
    TritonProxyDep,
)
from .errors import (
    RETRY_AFTER_S,
    GatewayError,
    InvalidImage,
    ModelNotFound,
    PayloadTooLarge,
    TooManyRequests,
    TritonFailed,
    TritonTimeout,
    TritonUnavailable,
    UnsupportedMediaType,
)
from .inputs import read_images
from .kserve import forward, read_checked_request
from .metrics import GatewayMetrics
from .offload import result_within
from .postprocess import top_k
from .preprocess import batch_layout, encoded_batch, input_batch, prepare_batch, quick_to_preprocess
from .replicas import ReplicaPool
from .security import Unauthorized, require_api_key, require_key_for_metrics
from .shadow import CanaryWatch
from .shared_memory import Slot
from .triton import Inference, ModelInfo

ModelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", examples=["digits"])]
VersionPath = Annotated[str, Path(pattern=r"^[0-9]{1,18}$", examples=["1"])]

health = APIRouter(tags=["health"])
models = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])
kserve = APIRouter(tags=["kserve v2"], dependencies=[Depends(require_api_key)])

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
CLASSIFY_EXAMPLE = {
    "model": "digits",
    "version": "1",
    "results": [
        {"predictions": [{"label": "3", "index": 3, "score": 0.97}, {"label": "8", "index": 8, "score": 0.01}]}
    ],
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error the gateway answers, whatever its status."""

    error: ErrorDetail


# One example per status, as the gateway answers it: (error, what it means, a message it sends).
ERROR_EXAMPLES: dict[int, tuple[type[GatewayError], str, str]] = {
    400: (InvalidImage, "Not an image, or a malformed body", "image 0: cannot identify image file"),
    401: (
        Unauthorized,
        "Missing or wrong API key (where the gateway has keys)",
        "missing or invalid API key; send 'Authorization: Bearer <key>'",
    ),
    404: (ModelNotFound, "Unknown model or version", "model 'cats' is not served"),
    413: (
        PayloadTooLarge,
        "Body, pixels or images per request over the limit",
        "image 0: 48000000 pixels is more than the limit of 40000000",
    ),
    415: (
        UnsupportedMediaType,
        "Content type not accepted",
        "content type 'text/plain' is not accepted; send an image, multipart/form-data or JSON",
    ),
    422: (GatewayError, "A path or query value out of range", "top_k: Input should be greater than or equal to 1"),
    429: (
        TooManyRequests,
        "Too many requests in flight, or the model's queue is full; see Retry-After",
        "the gateway is serving 64 requests; retry shortly",
    ),
    502: (TritonFailed, "Triton failed the request", "Triton error: failed to run the model"),
    503: (
        TritonUnavailable,
        "Triton or the model is not available, or the gateway is shutting down; see Retry-After",
        "Triton or model 'digits' is unavailable",
    ),
    504: (TritonTimeout, "Triton did not answer in time; see Retry-After", "Triton did not answer in time"),
}
ERROR_CODES = {422: "invalid_request"}  # FastAPI's validation errors, answered by the app's handler


def _error_responses(*statuses: int) -> dict[int | str, dict]:
    responses: dict[int | str, dict] = {}
    for status in statuses:
        error, description, message = ERROR_EXAMPLES[status]
        example = {"error": {"code": ERROR_CODES.get(status, error.code), "message": message}}
        responses[status] = {
            "description": description,
            "model": ErrorBody,
            "content": {"application/json": {"example": example}},
        }
    return responses


def _answer(example: dict[str, Any]) -> dict[int | str, dict]:
    """The 200 answer's example, for an endpoint that returns a plain dict or Triton's JSON."""
    return {200: {"content": {"application/json": {"example": example}}}}


MODEL_DETAILS_EXAMPLE = {
    "name": "digits",
    "ready": True,
    "versions": [{"version": "1", "state": "READY"}, {"version": "2", "state": "READY"}],
    "preprocessing": {
        "image_size": 8,
        "resize_size": 8,
        "mean": [0.3],
        "std": [0.3],
        "color_mode": "L",
        "interpolation": "bilinear",
        "equalize": False,
        "layout": "NCHW",
    },
    "labels": ["0", "1", "2"],
    "input": "input",
    "input_datatype": "FP32",
    "output": "logits",
    "max_batch_size": 32,
    "rollout": {"stable": 1, "canary": 2, "canary_percent": 10.0, "sticky_header": ""},
    "statistics": {"model_stats": [{"name": "digits", "version": "1", "inference_count": "12"}]},
}
V2_METADATA_EXAMPLE = {
    "name": "digits",
    "versions": ["1"],
    "platform": "python",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
V2_INFER_ANSWER_EXAMPLE = {
    "model_name": "digits",
    "model_version": "1",
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}],
}


def _group_versions(index: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Triton lists one entry per version; group them per model. A model is ready if a version is."""
    grouped: dict[str, dict[str, Any]] = {}
    for entry in index:
        model = grouped.setdefault(entry["name"], {"name": entry["name"], "versions": [], "ready": False})
        if entry["version"]:
            model["versions"].append(
                {
                    "version": entry["version"],
                    "state": entry["state"],
                    **({"reason": entry["reason"]} if entry["reason"] else {}),
                }
            )
        model["ready"] = model["ready"] or entry["state"] == "READY"
    return sorted(grouped.values(), key=lambda m: m["name"])


def _not_ready(reason: str) -> JSONResponse:
    # Open to anyone: a short reason and nothing of Triton's (load errors carry tracebacks and paths);
    # /v1/models tells more, behind the key.
    return JSONResponse({"status": "not ready", "reason": reason}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


def _load_failed(version: dict[str, Any]) -> bool:
    """Triton tried to load the version and could not: unavailable with an error (an explicit unload leaves
    the reason "unloaded", a version still loading has none)."""
    return version["state"] == "UNAVAILABLE" and version.get("reason", "unloaded") != "unloaded"


def _failed(model: dict[str, Any]) -> bool:
    """Triton tried to load the model and could not: no version ready, and each one failed to load. A model
    listed with no version at all is one Triton did not load: an ensemble whose step failed to load is left
    so, the error only in Triton's log (its model_repository_manager.cc, "depends on ... which has no loaded
    version"); a model loading or retried lists its versions as LOADING."""
    versions = model["versions"]
    return not model["ready"] and all(_load_failed(v) for v in versions)


def _not_ready_names(models: list[dict[str, Any]], shown: int = 3) -> str:
    """The names of the models not ready, the first few: enough to find them on /v1/models."""
    names = [m["name"] for m in models]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


async def _served_models(triton: ReplicaPool, metrics: GatewayMetrics) -> list[dict[str, Any]]:
    """Triton's model index, grouped per model; counts each model's versions that failed to load on the way.
    A version that fails to load leaves the one before it serving, so only this count and /v1/models show it."""
    served = _group_versions(await triton.repository_index())
    metrics.observe_failed_versions(
        {m["name"]: [v["version"] for v in m["versions"] if _load_failed(v)] for m in served}
    )
    return served


@health.get(
    "/healthz",
    summary="The process is up",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz",
    summary="Triton is ready and so is every model the gateway must serve",
    description="The models of GATEWAY_REQUIRED_MODELS, or else every model in the repository but those "
    "that failed to load. 503 from SIGTERM on, while the gateway drains. Open without a key; per-model "
    "states and load errors are on /v1/models.",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready"}}}},
        503: {
            "description": "not ready; see Retry-After",
            "content": {
                "application/json": {"example": {"status": "not ready", "reason": "1 of 2 required models not ready"}}
            },
        },
    },
)
async def readyz(triton: ReplicasDep, settings: SettingsDep, drain: DrainDep, metrics: MetricsDep) -> JSONResponse:
    if drain.active:
        return _not_ready("the gateway is shutting down")
    if not await triton.server_ready():
        return _not_ready("Triton is not ready or unreachable")
    try:
        served = await _served_models(triton, metrics)
    except GatewayError:
        return _not_ready("Triton's model index is unavailable")
    required = settings.required_model_names()
    if required:
        ready = {m["name"] for m in served if m["ready"]}
        missing = [name for name in required if name not in ready]
        if missing:
            return _not_ready(
                f"{len(missing)} of {len(required)} required models not ready: "
                + _not_ready_names([{"name": name} for name in missing])
            )
        return JSONResponse({"status": "ready"})
    wanted = [m for m in served if not _failed(m)]
    if not wanted:
        return _not_ready("no model can be served")
    loading = [m for m in wanted if not m["ready"]]
    if loading:
        return _not_ready(f"{len(loading)} of {len(wanted)} models not ready: {_not_ready_names(loading)}")
    return JSONResponse({"status": "ready"})


@health.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(require_key_for_metrics)],
    description="Needs an API key where the gateway has keys, unless GATEWAY_METRICS_REQUIRE_KEY=false.",
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"example": "gateway_requests_total{...} 1.0"}}},
        **_error_responses(401),
    },
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.latest(), media_type=CONTENT_TYPE_LATEST)


@models.get(
    "/v1/models",
    summary="Served models with versions, state and preprocessing",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "models": [
                            {
                                "name": "digits",
                                "ready": True,
                                "versions": [{"version": "1", "state": "READY"}],
                                "preprocessing": {
                                    "image_size": 32,
                                    "resize_size": 32,
                                    "mean": [0.3],
                                    "std": [0.32],
                                    "color_mode": "L",
                                    "interpolation": "bilinear",
                                    "layout": "NCHW",
                                },
                            }
                        ]
                    }
                }
            }
        },
        **_error_responses(401, 503),
    },
)
async def list_models(triton: ReplicasDep, metrics: MetricsDep) -> dict[str, Any]:
    served = await _served_models(triton, metrics)
    for model in served:
        try:
            model["preprocessing"] = (await triton.model_info(model["name"])).spec.to_dict()
        except GatewayError:
            model["preprocessing"] = None
    return {"models": served}


@models.get(
    "/v1/models/{name}",
    summary="One model: versions, preprocessing, labels and Triton's statistics",
    responses={**_answer(MODEL_DETAILS_EXAMPLE), **_error_responses(401, 404, 422, 503)},
)
async def model_details(name: ModelName, triton: ReplicasDep, metrics: MetricsDep) -> dict[str, Any]:
    served = [m for m in await _served_models(triton, metrics) if m["name"] == name]
    if not served:
        raise ModelNotFound(f"model {name!r} is not in the repository")
    details = served[0]
    try:
        details.update((await triton.model_info(name)).public())
        details["statistics"] = await triton.statistics(name)
    except GatewayError as e:
        if not isinstance(e, (ModelNotFound, TritonUnavailable)):
            raise
        details["statistics"] = None
    return details


@models.post(
    "/v1/models/{name}/classify",
    summary="Classify one or more images",
    description="Send one image as the raw body (image/jpeg, image/png, image/webp, image/bmp, image/gif), "
    'several as multipart/form-data `image` fields, or as JSON `{"images": ["<base64>"]}`. '
    "Returns the top-k classes per image, in request order.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                **{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_MEDIA_TYPES},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                    },
                    "example": {"images": ["iVBORw0KGgoAAAANSUhEUgAAAAgAAAAIC..."]},
                },
            },
        }
    },
    responses={
        200: {"content": {"application/json": {"example": CLASSIFY_EXAMPLE}}},
        **_error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504),
    },
)
async def classify(
    name: ModelName,
    request: Request,
    settings: SettingsDep,
    metrics: MetricsDep,
    triton: ReplicasDep,
    region: InputRegionDep,
    budget: DecodeBudgetDep,
    executor: PreprocessExecutorDep,
    slots: InferenceSlotsDep,
    context: RequestContextDep,
    watch: CanaryWatchDep,
    top_k_: Annotated[
        int | None,
        Query(alias="top_k", ge=1, le=1000, description="classes per image; default GATEWAY_DEFAULT_TOP_K (5)"),
    ] = None,
    version: Annotated[
        str,
        Query(pattern=r"^[0-9]{0,18}$", description="pinned version; default: the model's rollout, else the newest"),
    ] = "",
) -> JSONResponse:
    tracer = request.app.state.tracer  # None: tracing is off
    async with slots.admit(context) as admission:
        with tracing.span(tracer, "read"):
            images = await read_images(request, settings)
        admission.take()
        metrics.images_per_request.observe(len(images))
        info = await triton.model_info(name)
        context["model"] = name
        # Under overload, possibly a faster model of the family (server/degrade.py); `name` is what was asked.
        info = await degrade.answering_model(triton, info, version, admission, metrics, context)
        if info.encoded_input:
            # Triton decodes (`builder publish --preprocess gpu`): only the headers are read here, for the limits;
            # in the thread pool unless they are quick to read (Pillow parses a JPEG's header in Python).
            started = time.perf_counter()
            # The padded batch may take what one request's body may: past it, one large image among many small
            # ones would cost memory here and in Triton many times the body limit.
            headers = partial(
                encoded_batch,
                images,
                settings.max_image_pixels,
                max_request_pixels=settings.max_request_pixels,
                max_batch_bytes=settings.max_body_bytes,
            )
            if quick_to_preprocess(images, settings.inline_preprocess_max_pixels, settings.inline_preprocess_max_bytes):
                batch, _ = headers()
            else:
                batch, _ = await result_within(executor.submit(headers), settings.preprocess_wait_s)
            context["stages"]["preprocess"] = time.perf_counter() - started
            await refuse_if_gone(request)
            started = time.perf_counter()
            inference = await _infer_version(triton, info, batch, version, None, request, context, watch)
            context["stages"]["inference"] = time.perf_counter() - started
            return _classified(name, inference, len(images), top_k_ or settings.default_top_k, info, metrics, context)
        held = (
            region.acquire(*batch_layout(len(images), info.spec, pixel_input=info.pixel_input))
            if region and not info.response_cache
            else None
        )
        slot, batch = held if held else (None, input_batch(len(images), info.spec, pixel_input=info.pixel_input))
        job = None
        try:
            await refuse_if_gone(request)
            work = partial(
                prepare_batch,
                images,
                info.spec,
                settings.max_image_pixels,
                settings.reduced_scale_decode(info.reduced_scale_decode),
                info.pixel_input,
                batch,
                max_request_pixels=settings.max_request_pixels,
                budget=budget,
            )
            with tracing.stage_spans(tracer, len(images)) as stages:
                if slots.in_flight == 1 and quick_to_preprocess(
                    images, settings.inline_preprocess_max_pixels, settings.inline_preprocess_max_bytes
                ):
                    metrics.preprocessing.labels("event_loop").inc()
                    _, decode_s, preprocess_s = work()
                else:
                    metrics.preprocessing.labels("thread_pool").inc()
                    job = executor.submit(work)
                    _, decode_s, preprocess_s = await result_within(job, settings.preprocess_wait_s)
                stages.record(decode_s, preprocess_s)
            context["stages"].update(decode=decode_s, preprocess=preprocess_s)
            await refuse_if_gone(request)
            started = time.perf_counter()
            inference = await _infer_version(triton, info, batch, version, slot, request, context, watch)
            context["stages"]["inference"] = time.perf_counter() - started
        finally:
            if slot and region and job:
                # Freed once the thread is done with it, even when this request was abandoned mid-way.
                job.add_done_callback(lambda _: region.release(slot))
            elif slot and region:
                region.release(slot)
        return _classified(name, inference, len(images), top_k_ or settings.default_top_k, info, metrics, context)


def _classified(
    name: str,
    inference: Inference,
    images: int,
    k: int,
    info: ModelInfo,
    metrics: GatewayMetrics,
    context: dict[str, Any],
) -> JSONResponse:
    # A degraded answer (`info` is the faster model's) is no version of `name`: kept out of its per-version metrics.
    context["version"] = inference.version if info.name == name else "degraded"
    metrics.images.labels(name).inc(images)
    metrics.triton_inputs.labels(inference.transport).inc()
    return JSONResponse(
        {
            "model": name,
            "version": inference.version,
            **degrade.answer_fields(name, info, inference.version),
            "results": top_k(inference.logits, k, info.labels),
        }
    )


async def _infer_version(
    triton: ReplicasDep,
    info: ModelInfo,
    batch: np.ndarray,
    pinned: str,
    slot: Slot | None,
    request: Request,
    context: dict[str, Any],
    watch: CanaryWatch,
) -> Inference:
    """The version the client pinned, else the one the model's rollout picks (server/shadow.py: the stable
    one once the canary is halted, and the stable one again for a request the canary failed), else Triton's
    own choice. Shadow comparisons start once the answer is in."""
    chosen = pinned or watch.route(info, request.headers)
    # Bounded: a version named in the model's config, never the client's string.
    context["version"] = "" if pinned else chosen
    try:
        inference = await (
            triton.infer(info, batch, chosen, slot) if pinned else watch.infer(triton, info, batch, chosen, slot)
        )
        watch.shadow(triton, info, batch, inference, routed=not pinned)
        return inference
    except (ModelNotFound, TritonUnavailable):
        if pinned or not chosen:
            raise
    # The rollout was promoted or aborted and Triton has unloaded this version before the cached config
    # expired: read the config again and route once more. The batch was made for `info`, which a rollout
    # does not change (its versions share one config).
    triton.forget_model_info(info.name)
    again = watch.route(await triton.model_info(info.name), request.headers)
    chosen = again if again != chosen else ""
    context["version"] = chosen
    return await triton.infer(info, batch, chosen, slot)


async def refuse_if_gone(request: Request) -> None:
    """A client that has closed its connection gets no more work done for it (answered as 499)."""
    if await request.is_disconnected():
        raise ClientDisconnect()


async def _infer(
    request: Request,
    settings: SettingsDep,
    proxy: TritonProxyDep,
    slots: InferenceSlotsDep,
    context: RequestContextDep,
    name: str,
    path: str,
) -> Response:
    """A KServe v2 inference: the body read and checked, and only then given a slot and forwarded."""
    async with slots.admit(context) as admission:
        body, headers = await read_checked_request(request, settings)
        admission.take()
        tracer = request.app.state.tracer  # None: tracing is off
        if tracer is None:
            return await forward(proxy, context, "POST", path, body, headers, model=name)
        with tracing.client_span(tracer, "triton.infer", {"triton.model.name": name, "triton.protocol": "http"}):
            return await forward(proxy, context, "POST", path, body, tracing.with_trace_context(headers), model=name)


@kserve.get(
    "/v2/models/{name}",
    summary="KServe v2 model metadata (from Triton)",
    responses={**_answer(V2_METADATA_EXAMPLE), **_error_responses(401, 404, 422, 502, 503, 504)},
)
async def v2_metadata(name: ModelName, proxy: TritonProxyDep, context: RequestContextDep) -> Response:
    return await forward(proxy, context, "GET", f"/v2/models/{name}")


@kserve.get(
    "/v2/models/{name}/versions/{version}",
    summary="KServe v2 model version metadata (from Triton)",
    responses={**_answer(V2_METADATA_EXAMPLE), **_error_responses(401, 404, 422, 502, 503, 504)},
)
async def v2_version_metadata(
    name: ModelName, version: VersionPath, proxy: TritonProxyDep, context: RequestContextDep
) -> Response:
    return await forward(proxy, context, "GET", f"/v2/models/{name}/versions/{version}")


V2_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "example": {
                    "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
                    "outputs": [{"name": "logits"}],
                }
            }
        },
    }
}


@kserve.post(
    "/v2/models/{name}/infer",
    summary="KServe v2 inference with tensors (passed to Triton)",
    openapi_extra=V2_INFER_BODY,
    responses={
        **_answer(V2_INFER_ANSWER_EXAMPLE),
        **_error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504),
    },
)
async def v2_infer(
    name: ModelName,
    request: Request,
    settings: SettingsDep,
    proxy: TritonProxyDep,
    slots: InferenceSlotsDep,
    context: RequestContextDep,
) -> Response:
    return await _infer(request, settings, proxy, slots, context, name, f"/v2/models/{name}/infer")


@kserve.post(
    "/v2/models/{name}/versions/{version}/infer",
    summary="KServe v2 inference of a pinned version",
    openapi_extra=V2_INFER_BODY,
    responses={
        **_answer(V2_INFER_ANSWER_EXAMPLE),
        **_error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504),
    },
)
async def v2_version_infer(
    name: ModelName,
    version: VersionPath,
    request: Request,
    settings: SettingsDep,
    proxy: TritonProxyDep,
    slots: InferenceSlotsDep,
    context: RequestContextDep,
) -> Response:
    return await _infer(request, settings, proxy, slots, context, name, f"/v2/models/{name}/versions/{version}/infer")
