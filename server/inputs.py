"""The images of a classification request: a raw image body, multipart `image` fields, or JSON base64."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from .errors import BadRequest, InvalidImage, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .offload import parse_json_body
from .settings import Settings

RAW_MEDIA_TYPES = ("image/", "application/octet-stream")
# Headers that say how to read the body. Sent twice, one reader may take the first and another the last.
FRAMING_HEADERS = ("content-type", "content-encoding", "inference-header-content-length", "content-length",
                   "transfer-encoding")
DECIMAL = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts "²"


def refuse_repeated_framing_headers(request: Request) -> None:
    for name in FRAMING_HEADERS:
        if len(request.headers.getlist(name)) > 1:
            raise BadRequest(f"the {name} header comes more than once")


def decimal_header(value: str, name: str) -> int:
    """A header that carries a byte count: ASCII digits only, no longer than any real body needs."""
    if not DECIMAL.fullmatch(value.strip()):
        raise BadRequest(f"the {name} header must be a decimal byte count, got {value[:40]!r}")
    return int(value)


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and decimal_header(declared, "content-length") > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}", close_connection=True)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused as soon as it passes `limit` bytes whatever its framing (chunked uploads
    included), or once it has taken more than `timeout_s` to arrive (408)."""
    refuse_repeated_framing_headers(request)
    _check_declared_length(request, limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", close_connection=True)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)",
                             close_connection=True) from None
    return b"".join(chunks)


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {settings.max_images_per_request}")


async def _pieces(body: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


async def _multipart(request: Request, settings: Settings) -> list[bytes]:
    # The body is read whole and bounded first: the parser, fed from the request itself, would spool any
    # amount of a chunked upload to disk before its size could be checked.
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    parser = MultiPartParser(request.headers, _pieces(body), max_files=settings.max_images_per_request + 1,
                             max_fields=100)
    try:
        form = await parser.parse()
    except Exception as e:  # starlette's parser raises several kinds for broken bodies
        raise BadRequest(f"malformed multipart body: {e}") from e
    try:
        files = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
        if not files:
            raise BadRequest("multipart body has no file field named 'image'")
        _check_count(len(files), settings)
        images = [await f.read() for f in files]
    finally:
        await form.close()
    return images


def _decode_base64(position: int, text: object) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"images[{position}] must be a base64 string")
    if text.startswith("data:") and "," in text:  # a data URL: keep only the payload
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"images[{position}] is not valid base64") from e


async def _json(request: Request, settings: Settings) -> list[bytes]:
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        document = await parse_json_body(body, json.loads)
    except RecursionError:
        raise BadRequest("body is nested too deeply to be the JSON of images") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise BadRequest('JSON body must be {"images": ["<base64>", ...]} with at least one image')
    _check_count(len(images), settings)
    return [_decode_base64(i, text) for i, text in enumerate(images)]


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """Encoded images, in request order; a 4xx GatewayError for anything else."""
    refuse_repeated_framing_headers(request)
    media_type = media_type_of(request)
    if media_type == "multipart/form-data":
        return await _multipart(request, settings)
    if media_type == "application/json":
        return await _json(request, settings)
    if media_type.startswith(RAW_MEDIA_TYPES):
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if not body:
            raise InvalidImage("request body is empty")
        return [body]
    raise UnsupportedMediaType(
        f"content type {media_type or '(none)'!r} is not supported; send an image (image/jpeg, image/png, ...), "
        "multipart/form-data with 'image' file fields, or application/json with base64 'images'"
    )
