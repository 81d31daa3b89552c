"""The FastAPI gateway: images in, top-k classes out, with Triton doing the inference.

A classification runs as: read the body -> decode and preprocess (in a thread pool, with the
model's published spec) -> one Triton call -> softmax and top-k -> JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import (
    BadRequest, GatewayError, InvalidImage, PayloadTooLarge, UnsupportedMediaType,
)
from .metrics import GatewayMetrics
from .preprocess import ImageTooLargeError, InvalidImageError, PreprocessSpec, decode_image, preprocess
from .settings import Settings, get_settings
from .triton import TritonClient

log = logging.getLogger("server")
RAW_MEDIA_TYPES = ("image/", "application/octet-stream")


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def prepare_batch(
    images: list[bytes], spec: PreprocessSpec, max_pixels: int
) -> tuple[np.ndarray, float, float]:
    """Decode and preprocess every image; returns the batch and the seconds spent in each stage."""
    decode_s = preprocess_s = 0.0
    tensors = []
    for position, data in enumerate(images):
        started = time.perf_counter()
        try:
            image = decode_image(data, max_pixels=max_pixels)
        except ImageTooLargeError as e:
            raise PayloadTooLarge(f"image {position}: {e}") from e
        except InvalidImageError as e:
            raise InvalidImage(f"image {position}: {e}") from e
        decoded = time.perf_counter()
        tensors.append(preprocess(image, spec))
        decode_s += decoded - started
        preprocess_s += time.perf_counter() - decoded
    return np.stack(tensors), decode_s, preprocess_s


def top_k(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Softmax over classes, then the k most probable per image, most probable first."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    results = []
    for row in probabilities:
        best = np.argsort(-row, kind="stable")[:k]
        results.append({"predictions": [
            {"label": labels[i] if i < len(labels) else str(i), "index": int(i), "score": float(row[i])}
            for i in best
        ]})
    return results


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The images of a raw-image body or of a multipart body's `image` fields."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {settings.max_body_bytes}")
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1)
        except Exception as e:  # starlette's parser raises several kinds for broken bodies
            raise BadRequest(f"malformed multipart body: {e}") from e
        files = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
        if not files:
            raise BadRequest("multipart body has no file field named 'image'")
        if len(files) > settings.max_images_per_request:
            raise PayloadTooLarge(f"{len(files)} images; the limit is {settings.max_images_per_request}")
        return [await f.read() for f in files]
    if media_type.startswith(RAW_MEDIA_TYPES):
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise InvalidImage("request body is empty")
        return [body]
    raise UnsupportedMediaType(
        f"content type {media_type or '(none)'!r} is not supported; send an image (image/jpeg, image/png, ...) "
        "or multipart/form-data with 'image' file fields"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(
            settings.triton_url, protocol=settings.triton_protocol, timeout_s=settings.triton_timeout_s,
            info_ttl_s=settings.model_info_ttl_s,
        )
        app.state.pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        try:
            yield
        finally:
            await app.state.triton.close()
            app.state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Image classification gateway",
        description="Classifies images with models served by Triton Inference Server.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics
    _install_error_handlers(app)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Triton and every served model are ready")
    async def readyz(request: Request) -> JSONResponse:
        triton: TritonClient = request.app.state.triton
        if not await triton.server_ready():
            return JSONResponse({"status": "not ready", "reason": "Triton is not ready or unreachable"}, 503,
                                headers={"Retry-After": "1"})
        try:
            models = _group_versions(await triton.repository_index())
        except GatewayError as e:
            return JSONResponse({"status": "not ready", "reason": e.message}, 503, headers={"Retry-After": "1"})
        not_ready = [m["name"] for m in models if not m["ready"]]
        if not models or not_ready:
            reason = f"models not ready: {', '.join(not_ready)}" if not_ready else "no models are served"
            return JSONResponse({"status": "not ready", "reason": reason, "models": models}, 503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": models})

    @app.get("/v1/models", tags=["models"], summary="Served models with versions, state and preprocessing")
    async def list_models(request: Request) -> dict[str, Any]:
        triton: TritonClient = request.app.state.triton
        models = _group_versions(await triton.repository_index())
        for model in models:
            try:
                model["preprocessing"] = (await triton.model_info(model["name"])).spec.to_dict()
            except GatewayError:
                model["preprocessing"] = None
        return {"models": models}

    @app.post(
        "/v1/models/{name}/classify",
        tags=["models"],
        summary="Classify one or more images",
        openapi_extra={"requestBody": {"required": True, "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        }}},
    )
    async def classify(
        name: str,
        request: Request,
        top_k_: Annotated[int, Query(alias="top_k", ge=1, le=1000)] = settings.default_top_k,
        version: Annotated[str, Query(pattern=r"^[0-9]*$", max_length=18)] = "",
    ) -> JSONResponse:
        started = time.perf_counter()
        status, model_label = 500, "unknown"
        metrics.in_flight.inc()
        try:
            triton: TritonClient = request.app.state.triton
            images = await read_images(request, settings)
            info = await triton.model_info(name)
            model_label = name
            batch, decode_s, preprocess_s = await asyncio.get_running_loop().run_in_executor(
                request.app.state.pool, prepare_batch, images, info.spec, settings.max_image_pixels
            )
            metrics.observe_stage("decode", decode_s)
            metrics.observe_stage("preprocess", preprocess_s)
            inference_started = time.perf_counter()
            logits, served_version = await triton.infer(info, batch, version)
            metrics.observe_stage("inference", time.perf_counter() - inference_started)
            metrics.images.labels(name).inc(len(images))
            status = 200
            return JSONResponse({"model": name, "version": served_version,
                                 "results": top_k(logits, top_k_, info.labels)})
        except GatewayError as e:
            status = e.status
            raise
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(model_label, str(status)).inc()
            metrics.observe_stage("total", time.perf_counter() - started)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _group_versions(index: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Triton lists one entry per version; group them per model. A model is ready if a version is."""
    models: dict[str, dict[str, Any]] = {}
    for entry in index:
        model = models.setdefault(entry["name"], {"name": entry["name"], "versions": [], "ready": False})
        if entry["version"]:
            model["versions"].append({"version": entry["version"], "state": entry["state"],
                                      **({"reason": entry["reason"]} if entry["reason"] else {})})
        model["ready"] = model["ready"] or entry["state"] == "READY"
    return sorted(models.values(), key=lambda m: m["name"])


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(error.code, error.message), error.status, headers=error.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse(error_body("invalid_request", problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(code, str(error.detail)), error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error; see the gateway log"), 500)
