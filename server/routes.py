"""HTTP routes: health, models, classification, and the KServe v2 pass-through to Triton.

A classification reads as: read the images -> look up the model's spec -> decode and preprocess (in
the thread pool, or on the event loop for a small JPEG alone in the gateway) -> one Triton call ->
softmax and top-k -> JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import zlib
from concurrent.futures import Future
from functools import partial
from typing import Annotated, Any

import httpx
import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from .errors import (
    BadRequest, GatewayError, InvalidImage, ModelNotFound, PayloadTooLarge, RefusedByTriton, TooManyRequests,
    TritonFailed, TritonTimeout, TritonUnavailable, UnsupportedMediaType,
)
from .inputs import decimal_header, read_body, read_images, refuse_repeated_framing_headers
from .offload import parse_json_body
from .postprocess import top_k
from .preprocess import (
    DecodeBudget, DecoderBusyError, ImageTooLargeError, InvalidImageError, PreprocessSpec, batch_layout, input_batch,
    load_image, model_input, open_image, quick_to_preprocess, release_memory,
)
from .security import Unauthorized, require_api_key, require_key_for_metrics
from .pool import TritonPool
from .shared_memory import InputRegion
from .triton import RETRY_AFTER_S

ModelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", examples=["digits"])]
VersionPath = Annotated[str, Path(pattern=r"^[0-9]{1,18}$", examples=["1"])]

health = APIRouter(tags=["health"])
models = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])
kserve = APIRouter(tags=["kserve v2"], dependencies=[Depends(require_api_key)])

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
CLASSIFY_EXAMPLE = {"model": "digits", "version": "1", "results": [{"predictions": [
    {"label": "3", "index": 3, "score": 0.97}, {"label": "8", "index": 8, "score": 0.01}]}]}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error the gateway answers, whatever its status."""

    error: ErrorDetail


# One example per status, as the gateway answers it: (error, what it means, a message it sends).
ERROR_EXAMPLES: dict[int, tuple[type[GatewayError], str, str]] = {
    400: (InvalidImage, "Not an image, or a malformed body", "image 0: cannot identify image file"),
    401: (Unauthorized, "Missing or wrong API key (where the gateway has keys)",
          "missing or invalid API key; send 'Authorization: Bearer <key>'"),
    404: (ModelNotFound, "Unknown model or version", "model 'cats' is not served"),
    413: (PayloadTooLarge, "Body, pixels or images per request over the limit",
          "image 0: 48000000 pixels is more than the limit of 40000000"),
    415: (UnsupportedMediaType, "Content type not accepted",
          "content type 'text/plain' is not accepted; send an image, multipart/form-data or JSON"),
    422: (GatewayError, "A path or query value out of range", "top_k: Input should be greater than or equal to 1"),
    429: (TooManyRequests, "Too many requests in flight, or the model's queue is full; see Retry-After",
          "the gateway is serving 64 requests; retry shortly"),
    502: (TritonFailed, "Triton failed the request", "Triton error: failed to run the model"),
    503: (TritonUnavailable, "Triton or the model is not available; see Retry-After",
          "Triton or model 'digits' is unavailable"),
    504: (TritonTimeout, "Triton did not answer in time; see Retry-After", "Triton did not answer in time"),
}
ERROR_CODES = {422: "invalid_request"}  # FastAPI's validation errors, answered by the app's handler


def _error_responses(*statuses: int) -> dict[int | str, dict]:
    responses: dict[int | str, dict] = {}
    for status in statuses:
        error, description, message = ERROR_EXAMPLES[status]
        example = {"error": {"code": ERROR_CODES.get(status, error.code), "message": message}}
        responses[status] = {"description": description, "model": ErrorBody,
                             "content": {"application/json": {"example": example}}}
    return responses


def _answer(example: dict[str, Any]) -> dict[int | str, dict]:
    """The 200 answer's example, for an endpoint that returns a plain dict or Triton's JSON."""
    return {200: {"content": {"application/json": {"example": example}}}}


MODEL_DETAILS_EXAMPLE = {
    "name": "digits", "ready": True, "versions": [{"version": "1", "state": "READY"}],
    "preprocessing": {"image_size": 8, "resize_size": 8, "mean": [0.3], "std": [0.3], "color_mode": "L",
                      "interpolation": "bilinear", "equalize": False, "layout": "NCHW"},
    "labels": ["0", "1", "2"], "input": "input", "input_datatype": "FP32", "output": "logits",
    "max_batch_size": 32, "statistics": {"model_stats": [{"name": "digits", "version": "1", "inference_count": "12"}]}}
V2_METADATA_EXAMPLE = {
    "name": "digits", "versions": ["1"], "platform": "python",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
V2_INFER_ANSWER_EXAMPLE = {
    "model_name": "digits", "model_version": "1",
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}]}


def prepare_batch(
    images: list[bytes], spec: PreprocessSpec, max_pixels: int, jpeg_draft: bool = False, pixel_input: bool = False,
    out: np.ndarray | None = None, *, max_request_pixels: int | None = None, budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, float, float]:
    """Decode and preprocess every image (into `out` if given); returns the batch and the seconds spent
    in each stage.

    Every header is read first: a request over `max_pixels` per image or `max_request_pixels` in
    all is refused (413) before any pixel is decoded, and one whose images are large in all holds its
    share of `budget` while they are decoded (429 when the share is taken): many images just under the
    large size cost as much as one large image of their sum."""
    draft_size = spec.resize_size if jpeg_draft else None
    decode_s = preprocess_s = 0.0
    started = time.perf_counter()
    opened: list[Image.Image | None] = []
    for position, data in enumerate(images):
        try:
            opened.append(open_image(data, max_pixels=max_pixels))
        except ImageTooLargeError as e:
            raise PayloadTooLarge(f"image {position}: {e}") from e
        except InvalidImageError as e:
            raise InvalidImage(f"image {position}: {e}") from e
    sizes = [image.width * image.height for image in opened]
    if max_request_pixels is not None and sum(sizes) > max_request_pixels:
        raise PayloadTooLarge(f"the images have {sum(sizes)} pixels in all, more than the limit of "
                              f"{max_request_pixels} per request")
    decode_s += time.perf_counter() - started
    # Each image goes straight into its place in the batch: no stacking copy afterwards.
    batch = input_batch(len(images), spec, pixel_input=pixel_input) if out is None else out
    large = False
    try:
        with budget.hold(sum(sizes)) if budget else contextlib.nullcontext(False) as large:
            for position in range(len(opened)):
                started = time.perf_counter()
                image, opened[position] = opened[position], None  # its pixels are freed once it is done
                try:
                    image = load_image(image, draft_size=draft_size)
                except InvalidImageError as e:
                    raise InvalidImage(f"image {position}: {e}") from e
                decoded = time.perf_counter()
                model_input(image, spec, pixel_input=pixel_input, out=batch[position])
                del image
                decode_s += decoded - started
                preprocess_s += time.perf_counter() - decoded
    except DecoderBusyError as e:
        raise TooManyRequests(str(e), retry_after_s=RETRY_AFTER_S) from e
    finally:
        if large:
            release_memory()
    return batch, decode_s, preprocess_s


def _group_versions(index: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Triton lists one entry per version; group them per model. A model is ready if a version is."""
    grouped: dict[str, dict[str, Any]] = {}
    for entry in index:
        model = grouped.setdefault(entry["name"], {"name": entry["name"], "versions": [], "ready": False})
        if entry["version"]:
            model["versions"].append({"version": entry["version"], "state": entry["state"],
                                      **({"reason": entry["reason"]} if entry["reason"] else {})})
        model["ready"] = model["ready"] or entry["state"] == "READY"
    return sorted(grouped.values(), key=lambda m: m["name"])


def _not_ready(reason: str) -> JSONResponse:
    # Open to anyone: a short reason and nothing of Triton's (load errors carry tracebacks and paths);
    # /v1/models tells more, behind the key.
    return JSONResponse({"status": "not ready", "reason": reason}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


def _failed(model: dict[str, Any]) -> bool:
    """Triton tried to load the model and could not: no version ready, each one unavailable with an error
    (an explicit unload leaves the reason "unloaded", a model still loading has none)."""
    versions = model["versions"]
    return (not model["ready"] and bool(versions)
            and all(v["state"] == "UNAVAILABLE" and v.get("reason", "unloaded") != "unloaded" for v in versions))


@health.get("/healthz", summary="The process is up",
            responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", summary="Triton is ready and so is every model the gateway must serve",
            description="The models of GATEWAY_REQUIRED_MODELS, or else every model in the repository but those "
                        "that failed to load. Open without a key; per-model states and load errors are on "
                        "/v1/models.",
            responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}},
                       503: {"description": "not ready; see Retry-After", "content": {"application/json": {
                           "example": {"status": "not ready", "reason": "1 of 2 required models not ready"}}}}})
async def readyz(request: Request) -> JSONResponse:
    triton: TritonPool = request.app.state.triton
    if not await triton.server_ready():
        return _not_ready("Triton is not ready or unreachable")
    try:
        served = _group_versions(await triton.repository_index())
    except GatewayError:
        return _not_ready("Triton's model index is unavailable")
    required = request.app.state.settings.required_model_names()
    if required:
        ready = {m["name"] for m in served if m["ready"]}
        missing = [name for name in required if name not in ready]
        if missing:
            return _not_ready(f"{len(missing)} of {len(required)} required models not ready")
        return JSONResponse({"status": "ready"})
    wanted = [m for m in served if not _failed(m)]
    if not wanted:
        return _not_ready("no model can be served")
    missing = [m for m in wanted if not m["ready"]]
    if missing:
        return _not_ready(f"{len(missing)} of {len(wanted)} models not ready")
    return JSONResponse({"status": "ready"})


@health.get("/metrics", summary="Prometheus metrics", response_class=Response,
            dependencies=[Depends(require_key_for_metrics)],
            description="Needs an API key where the gateway has keys, unless GATEWAY_METRICS_REQUIRE_KEY=false.",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "gateway_requests_total{...} 1.0"}}},
                       **_error_responses(401)})
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@models.get("/v1/models", summary="Served models with versions, state and preprocessing",
            responses={200: {"content": {"application/json": {"example": {"models": [
                {"name": "digits", "ready": True, "versions": [{"version": "1", "state": "READY"}],
                 "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.3], "std": [0.32],
                                   "color_mode": "L", "interpolation": "bilinear", "layout": "NCHW"}}]}}}},
                       **_error_responses(401, 503)})
async def list_models(request: Request) -> dict[str, Any]:
    triton: TritonPool = request.app.state.triton
    served = _group_versions(await triton.repository_index())
    for model in served:
        try:
            model["preprocessing"] = (await triton.model_info(model["name"])).spec.to_dict()
        except GatewayError:
            model["preprocessing"] = None
    return {"models": served}


@models.get("/v1/models/{name}", summary="One model: versions, preprocessing, labels and Triton's statistics",
            responses={**_answer(MODEL_DETAILS_EXAMPLE), **_error_responses(401, 404, 422, 503)})
async def model_details(name: ModelName, request: Request) -> dict[str, Any]:
    triton: TritonPool = request.app.state.triton
    served = [m for m in _group_versions(await triton.repository_index()) if m["name"] == name]
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
                "several as multipart/form-data `image` fields, or as JSON `{\"images\": [\"<base64>\"]}`. "
                "Returns the top-k classes per image, in request order.",
    openapi_extra={"requestBody": {"required": True, "content": {
        **{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_MEDIA_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}},
            "example": {"images": ["iVBORw0KGgoAAAANSUhEUgAAAAgAAAAIC..."]}},
    }}},
    responses={200: {"content": {"application/json": {"example": CLASSIFY_EXAMPLE}}},
               **_error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504)},
)
async def classify(
    name: ModelName,
    request: Request,
    top_k_: Annotated[int, Query(alias="top_k", ge=1, le=1000, description="classes per image")] = 5,
    version: Annotated[str, Query(pattern=r"^[0-9]{0,18}$", description="pinned version; default newest")] = "",
) -> JSONResponse:
    app = request.app
    settings, metrics, triton = app.state.settings, app.state.metrics, app.state.triton
    context = request.state.context
    async with inference_slot(request) as slot_of_request:
        images = await read_images(request, settings)
        slot_of_request.take()
        metrics.images_per_request.observe(len(images))
        info = await triton.model_info(name)
        context["model"] = name
        region: InputRegion | None = app.state.input_region
        held = (region.acquire(*batch_layout(len(images), info.spec, pixel_input=info.pixel_input))
                if region and not info.response_cache else None)
        slot, batch = held if held else (None, input_batch(len(images), info.spec, pixel_input=info.pixel_input))
        job = None
        try:
            await refuse_if_gone(request)
            work = partial(prepare_batch, images, info.spec, settings.max_image_pixels, settings.jpeg_draft,
                           info.pixel_input, batch, max_request_pixels=settings.max_request_pixels,
                           budget=app.state.decode_budget)
            if app.state.in_flight == 1 and quick_to_preprocess(
                    images, settings.inline_preprocess_max_pixels, settings.inline_preprocess_max_bytes):
                metrics.preprocessing.labels("event_loop").inc()
                _, decode_s, preprocess_s = work()
            else:
                metrics.preprocessing.labels("thread_pool").inc()
                job = app.state.pool.submit(work)
                _, decode_s, preprocess_s = await in_pool(job, settings.preprocess_wait_s)
            context["stages"].update(decode=decode_s, preprocess=preprocess_s)
            await refuse_if_gone(request)
            started = time.perf_counter()
            inference = await triton.infer(info, batch, version, slot)
            context["stages"]["inference"] = time.perf_counter() - started
        finally:
            if slot and job:
                # Freed once the thread is done with it, even when this request was abandoned mid-way.
                job.add_done_callback(lambda _: region.release(slot))
            elif slot:
                region.release(slot)
        metrics.images.labels(name).inc(len(images))
        metrics.triton_inputs.labels(inference.transport).inc()
        return JSONResponse({"model": name, "version": inference.version,
                             "results": top_k(inference.logits, top_k_, info.labels)})


async def refuse_if_gone(request: Request) -> None:
    """A client that has closed its connection gets no more work done for it (answered as 499)."""
    if await request.is_disconnected():
        raise ClientDisconnect()


async def in_pool(job: Future, wait_s: float) -> Any:
    """The result of work handed to the preprocessing threads; refused (429) when no thread has taken it
    up within `wait_s`, rather than queueing behind expensive requests without end."""
    result = asyncio.wrap_future(job)
    done, _ = await asyncio.wait({result}, timeout=wait_s)
    if not done and job.cancel():  # still queued: cancelling only succeeds before a thread starts it
        raise TooManyRequests(f"no preprocessing thread was free within {wait_s:g} s; retry shortly",
                              retry_after_s=RETRY_AFTER_S)
    return await result


class inference_slot:
    """An inference request in the gateway. It counts as in flight from the start (the gauge, and whether a
    request is alone), and holds one of `max_in_flight` slots from `take()` on, called once its body is
    in: a client that sends its body slowly holds a connection, never capacity. Past the limit, `take()`
    refuses the request with 429 at once."""

    def __init__(self, request: Request) -> None:
        self.state = request.app.state
        self.holds_slot = False
        request.state.context["inference"] = True

    async def __aenter__(self) -> inference_slot:
        self.state.in_flight += 1
        self.state.metrics.in_flight.inc()
        return self

    def take(self) -> None:
        if self.state.slots_taken >= self.state.settings.max_in_flight:
            raise TooManyRequests(f"the gateway is serving {self.state.slots_taken} requests; retry shortly",
                                  retry_after_s=RETRY_AFTER_S)
        self.state.slots_taken += 1
        self.holds_slot = True

    async def __aexit__(self, *exc_info) -> None:
        self.state.in_flight -= 1
        self.state.metrics.in_flight.dec()
        if self.holds_slot:
            self.state.slots_taken -= 1


# KServe v2 for clients that send tensors: forwarded to Triton's HTTP endpoint as they are, binary
# tensor extension included. Only inference and model metadata pass; the repository API never does.
# The body is forwarded as received (compressed or not); the answer comes back uncompressed, since httpx
# decodes it and the binary extension's header length counts uncompressed bytes.
PASSED_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")
PASSED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise BadRequest("the inference header repeats a key")
    return dict(pairs)


def forwarded_headers(request: Request) -> dict[str, str]:
    """The request's framing headers as the gateway reads them and Triton gets them: each at most once,
    printable ASCII (what httpx can send), surrounding whitespace dropped (RFC 9110: not part of a field
    value), the content coding lower-case (codings are case-insensitive; Triton knows the lower-case
    names) and left out when it is identity, the header length checked as a decimal number."""
    refuse_repeated_framing_headers(request)
    headers = {}
    for name in PASSED_REQUEST_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        value = value.strip()
        if not (value.isascii() and value.isprintable()):
            raise BadRequest(f"the {name} header holds characters other than printable ASCII")
        if name == "content-encoding":
            value = value.lower()
            if value not in ("gzip", "deflate", "identity"):
                raise UnsupportedMediaType(f"content encoding {value!r} is not accepted; use gzip or deflate")
            if value == "identity":
                continue
        elif name == "inference-header-content-length":
            value = str(decimal_header(value, name))
        headers[name] = value
    return headers


def inference_header(body: bytes, headers: dict[str, str], limit: int) -> dict[str, Any]:
    """The JSON header of a KServe v2 request read as Triton will read it: gzip or deflate undone, the
    binary extension's header length applied, no repeated keys to read two ways."""
    encoding = headers.get("content-encoding")
    if encoding:
        unpacker = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = unpacker.decompress(body, limit + 1)
        except zlib.error as e:
            raise BadRequest(f"cannot decompress the {encoding} body: {e}") from e
        if len(body) > limit:
            raise PayloadTooLarge(f"the body unpacks to more than {limit} bytes")
    length = headers.get("inference-header-content-length")
    if length is not None:
        if not 0 < int(length) <= len(body):
            raise BadRequest(f"the inference header length {length} is not within the body's {len(body)} bytes")
        body = body[:int(length)]
    try:
        # Strict UTF-8 as Triton reads it: json.loads would also take UTF-16 and UTF-32 bytes.
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the inference header is not UTF-8 text: {e}") from None
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("the inference header is nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"the inference header is not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise BadRequest("the inference header is not a JSON object")
    if SURROGATE_ESCAPE.search(text):  # the walk only where there may be something to find
        refuse_lone_surrogates(parsed)
    return parsed


# Python's JSON parser takes these and Triton's does not: refused here as the client's mistake. A number
# past a double's range (1e400) is left to Triton, whose refusal is mapped to 400 below: checking every
# number here would double the time to parse a large tensor.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> float:
    raise BadRequest(f"the inference header holds {name}, which is not JSON")


def refuse_lone_surrogates(parsed: Any) -> None:
    """A \\uD800 escape with no pair decodes to a string that is not Unicode text; Triton refuses it."""
    pending = [parsed]
    while pending:  # iterative: the JSON may nest as deep as the parser allowed
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("the inference header holds an unpaired surrogate (\\uD800-\\uDFFF)") from None


def refuse_shared_memory_parameters(parsed: dict[str, Any]) -> None:
    """KServe v2 lets a request name Triton shared-memory regions for its tensors. Through the gateway it
    may not: the gateway's own region holds other requests' images. Any parameter that names shared
    memory, on the request or on a tensor, is refused."""
    tensors = [t for key in ("inputs", "outputs") if isinstance(parsed.get(key), list) for t in parsed[key]]
    for owner in (parsed, *tensors):
        parameters = owner.get("parameters") if isinstance(owner, dict) else None
        if isinstance(parameters, dict) and any(key.startswith("shared_memory") for key in parameters):
            raise BadRequest("shared-memory parameters are not accepted through the gateway; send the tensors")


def _values_in(data: Any) -> int:
    count, pending = 0, [data]
    while pending:  # iterative: the JSON may nest as deep as the parser allowed
        item = pending.pop()
        if type(item) is not list:  # json.loads makes plain lists only
            count += 1
        elif list in map(type, item):  # scanned in C: a flat list of millions is counted at once
            pending.extend(item)
        else:
            count += len(item)
    return count


def refuse_data_that_does_not_fill_its_shape(parsed: dict[str, Any]) -> None:
    """Triton allocates a JSON tensor by its shape before it reads the data: a shape of 10^12 with the
    data of one image aborts it (std::bad_alloc). The count of values must be the shape's."""
    inputs = parsed.get("inputs")
    for tensor in inputs if isinstance(inputs, list) else []:
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if "data" not in (tensor or {}) or not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):
            continue  # Triton refuses these itself, before allocating anything
        values = _values_in(tensor["data"])
        if math.prod(shape) != values:
            raise BadRequest(f"input {str(tensor.get('name'))[:64]!r}: shape {shape} holds {math.prod(shape)} "
                             f"values, its data {values}")


def checked_inference_header(body: bytes, headers: dict[str, str], limit: int) -> dict[str, Any]:
    """The inference header, refused (4xx) where Triton must not see it."""
    parsed = inference_header(body, headers, limit)
    refuse_shared_memory_parameters(parsed)
    refuse_data_that_does_not_fill_its_shape(parsed)
    return parsed


# Triton's HTTP frontend answers 500 for a request body it cannot parse (its JSON errors are INTERNAL).
TRITON_PARSE_ERRORS = ("unable to parse", "failed to parse the request json buffer")


async def _forward(request: Request, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None, model: str = "") -> Response:
    proxy: httpx.AsyncClient = request.app.state.triton_http
    try:
        upstream = await proxy.request(method, path, content=body, headers=headers or {})
    except httpx.TimeoutException as e:
        raise TritonTimeout("Triton did not answer in time", retry_after_s=RETRY_AFTER_S) from e
    except httpx.HTTPError as e:
        raise TritonUnavailable("Triton is unreachable", retry_after_s=RETRY_AFTER_S) from e
    if upstream.status_code != 404 and model:
        request.state.context["model"] = model  # a served model: a bounded label value
    if upstream.status_code >= 400:
        try:
            message = upstream.json().get("error", upstream.text)
        except ValueError:
            message = upstream.text
        message = str(message)
        if "maximum queue size" in message.lower():
            raise TooManyRequests(message, retry_after_s=RETRY_AFTER_S)
        if upstream.status_code == 404:
            raise ModelNotFound(message)
        if upstream.status_code < 500:
            raise RefusedByTriton(message, upstream.status_code)
        if message.lower().startswith(TRITON_PARSE_ERRORS):
            raise RefusedByTriton(message)
        raise TritonFailed(message)
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}
    return Response(upstream.content, upstream.status_code, headers=headers)


async def _infer(request: Request, name: str, path: str) -> Response:
    """A KServe v2 inference: the body read (bounded in size and time), checked, and only then given a
    slot and forwarded with the headers that were checked."""
    settings = request.app.state.settings
    async with inference_slot(request) as slot_of_request:
        headers = forwarded_headers(request)
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        # A compressed body is unpacked first, to any size up to the limit: never inline.
        await parse_json_body(body, partial(checked_inference_header, headers=headers, limit=settings.max_body_bytes),
                              inline="content-encoding" not in headers)
        slot_of_request.take()
        return await _forward(request, "POST", path, body, headers, model=name)


@kserve.get("/v2/models/{name}", summary="KServe v2 model metadata (from Triton)",
            responses={**_answer(V2_METADATA_EXAMPLE), **_error_responses(401, 404, 422, 502, 503, 504)})
async def v2_metadata(name: ModelName, request: Request) -> Response:
    return await _forward(request, "GET", f"/v2/models/{name}")


@kserve.get("/v2/models/{name}/versions/{version}", summary="KServe v2 model version metadata (from Triton)",
            responses={**_answer(V2_METADATA_EXAMPLE), **_error_responses(401, 404, 422, 502, 503, 504)})
async def v2_version_metadata(name: ModelName, version: VersionPath, request: Request) -> Response:
    return await _forward(request, "GET", f"/v2/models/{name}/versions/{version}")


V2_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"example": {
    "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
    "outputs": [{"name": "logits"}]}}}}}


@kserve.post("/v2/models/{name}/infer", summary="KServe v2 inference with tensors (passed to Triton)",
             openapi_extra=V2_INFER_BODY, responses={**_answer(V2_INFER_ANSWER_EXAMPLE), **_error_responses(
                 400, 401, 404, 413, 415, 422, 429, 502, 503, 504)})
async def v2_infer(name: ModelName, request: Request) -> Response:
    return await _infer(request, name, f"/v2/models/{name}/infer")


@kserve.post("/v2/models/{name}/versions/{version}/infer", summary="KServe v2 inference of a pinned version",
             openapi_extra=V2_INFER_BODY, responses={**_answer(V2_INFER_ANSWER_EXAMPLE), **_error_responses(
                 400, 401, 404, 413, 415, 422, 429, 502, 503, 504)})
async def v2_version_infer(name: ModelName, version: VersionPath, request: Request) -> Response:
    return await _infer(request, name, f"/v2/models/{name}/versions/{version}/infer")
