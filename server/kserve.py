"""KServe v2 for clients that send tensors: the request checked as Triton will read it, then forwarded to
Triton's HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response

from .errors import (
    RETRY_AFTER_S,
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    RefusedByTriton,
    TooManyRequests,
    TritonFailed,
    TritonTimeout,
    TritonUnavailable,
    UnsupportedMediaType,
)
from .inputs import decimal_header, read_body, refuse_repeated_framing_headers, reserve_body_bytes
from .offload import parse_json_body
from .settings import Settings

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


INFLATE_STEP_BYTES = 1 << 20  # unpacked per step: about a millisecond of the event loop


async def inflated(request: Request, body: bytes, encoding: str, limit: int) -> bytes:
    """The body with its gzip or deflate undone, a step at a time on the event loop, each step's bytes
    reserved against the gateway's buffered bodies as they are unpacked (a 20 KB body may unpack to 20 MB;
    counting only what came over the wire let a few such bodies take gigabytes). 413 past `limit`."""
    unpacker = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    pieces, size, pending = [], 0, body
    try:
        while True:
            try:
                piece = unpacker.decompress(pending, INFLATE_STEP_BYTES)
            except zlib.error as e:
                raise BadRequest(f"cannot decompress the {encoding} body: {e}") from e
            size += len(piece)
            if size > limit:
                raise PayloadTooLarge(f"the body unpacks to more than {limit} bytes")
            reserve_body_bytes(request, len(piece))
            pieces.append(piece)
            pending = unpacker.unconsumed_tail
            if not pending and len(piece) < INFLATE_STEP_BYTES:
                return b"".join(pieces)
            await asyncio.sleep(0)  # other requests (health probes included) between steps
    finally:
        pieces.clear()


def json_header_of(body: bytes, headers: dict[str, str]) -> bytes:
    """The JSON part of an uncompressed body: all of it, or its first inference-header-content-length bytes
    when binary tensors follow."""
    length = headers.get("inference-header-content-length")
    if length is None:
        return body
    if not 0 < int(length) <= len(body):
        raise BadRequest(f"the inference header length {length} is not within the body's {len(body)} bytes")
    return body[: int(length)]


def inference_header(body: bytes) -> dict[str, Any]:
    """A KServe v2 request's JSON header (uncompressed, binary tensors cut off) read as Triton will read it:
    strict UTF-8, no repeated keys to read two ways."""
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
        if (
            not isinstance(tensor, dict)
            or "data" not in tensor
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            continue  # Triton refuses these itself, before allocating anything
        values = _values_in(tensor["data"])
        if math.prod(shape) != values:
            raise BadRequest(
                f"input {str(tensor.get('name'))[:64]!r}: shape {shape} holds {math.prod(shape)} "
                f"values, its data {values}"
            )


def checked_inference_header(body: bytes) -> dict[str, Any]:
    """The inference header, refused (4xx) where Triton must not see it."""
    parsed = inference_header(body)
    refuse_shared_memory_parameters(parsed)
    refuse_data_that_does_not_fill_its_shape(parsed)
    return parsed


# Triton's HTTP frontend answers 500 for a request body it cannot parse or use (its JSON errors are
# INTERNAL): a number it cannot read, an output's `classification` that is not a count, request
# `parameters` that are not an object.
TRITON_PARSE_ERRORS = (
    "unable to parse",
    "failed to parse the request json buffer",
    "unable to set",
    "failed to get request params",
)


async def forward(
    proxy: httpx.AsyncClient,
    context: dict[str, Any],
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    model: str = "",
) -> Response:
    """The request as Triton's HTTP endpoint answers it; Triton's refusals raised as the gateway's errors, so
    that the one error handler answers and counts them."""
    try:
        upstream = await proxy.request(method, path, content=body, headers=headers or {})
    except httpx.TimeoutException as e:
        raise TritonTimeout("Triton did not answer in time", retry_after_s=RETRY_AFTER_S) from e
    except httpx.HTTPError as e:
        raise TritonUnavailable("Triton is unreachable", retry_after_s=RETRY_AFTER_S) from e
    if upstream.status_code != 404 and model:
        context["model"] = model  # a served model: a bounded label value
    if upstream.status_code >= 400:
        try:
            answer = upstream.json()
        except ValueError:
            answer = None
        # Triton's errors are {"error": "..."}; any other body is passed on as text.
        message = str(answer.get("error", upstream.text) if isinstance(answer, dict) else upstream.text)
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


async def read_checked_request(request: Request, settings: Settings) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 inference request's body (bounded in size and time) and framing headers, checked as
    Triton will read them; refused (4xx) where Triton must not see it."""
    headers = forwarded_headers(request)
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    encoding = headers.get("content-encoding")
    unpacked = await inflated(request, body, encoding, settings.max_body_bytes) if encoding else body
    # Triton gets the body as it came; the unpacked copy is only read here.
    await parse_json_body(json_header_of(unpacked, headers), checked_inference_header)
    return body, headers
