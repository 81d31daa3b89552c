"""The images of a classification request: a raw image body, multipart `image` fields, or JSON base64."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import AsyncGenerator, Callable

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from .errors import (
    RETRY_AFTER_S,
    BadRequest,
    InvalidImage,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    UnsupportedMediaType,
)
from .offload import parse_json_body
from .settings import Settings

# Raw bodies: an image of a format the gateway decodes (with the common aliases), or bytes of any kind,
# which the decoder then checks. Another declared image type is refused before its body is read.
RAW_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "application/octet-stream",
    }
)
# Headers that say how to read the body. Sent twice, one reader may take the first and another the last.
FRAMING_HEADERS = (
    "content-type",
    "content-encoding",
    "inference-header-content-length",
    "content-length",
    "transfer-encoding",
)
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


def _declared_length(request: Request, limit: int) -> int:
    declared = request.headers.get("content-length")
    if declared is None:
        return 0
    length = decimal_header(declared, "content-length")
    if length > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}", close_connection=True)
    return length


class BufferedBodies:
    """The bytes of request bodies the gateway holds at once, across all requests, at most `limit`. Without
    it each slow client could make the gateway hold a body of the size limit: memory grows with the number
    of connections, not with the inference slots (taken only once a body is in)."""

    LARGE_BYTES = 1 << 20  # a release of at least this many bytes hands freed memory back to the system

    def __init__(self, limit: int, on_large_release: Callable[[], object] | None = None) -> None:
        self.limit, self.held = limit, 0
        self.on_large_release = on_large_release

    def reserve(self, size: int) -> None:
        if self.held + size > self.limit:
            raise TooManyRequests(
                f"the gateway holds {self.held} bytes of request bodies, its limit is {self.limit}; retry shortly",
                retry_after_s=RETRY_AFTER_S,
                close_connection=True,
            )
        self.held += size

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            if size >= self.LARGE_BYTES and self.on_large_release is not None:
                self.on_large_release()


def reserve_body_bytes(request: Request, size: int) -> None:
    """Counts `size` more bytes of this request's body against the gateway's BufferedBodies; the request's
    middleware gives them all back when the request ends, whichever way it ends."""
    bodies: BufferedBodies | None = getattr(request.app.state, "bodies", None)
    context = getattr(request.state, "context", None)
    if bodies is None or context is None or not size:
        return
    bodies.reserve(size)
    context["buffered_bytes"] = context.get("buffered_bytes", 0) + size


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused as soon as it passes `limit` bytes whatever its framing (chunked uploads
    included), or once it has taken more than `timeout_s` to arrive (408). Its bytes are reserved against
    the gateway's buffered total as they arrive, not by Content-Length: a client that announces a large
    body and sends little holds little; past the total 429."""
    refuse_repeated_framing_headers(request)
    _declared_length(request, limit)  # a declared length over the limit is refused before any byte comes
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", close_connection=True)
                reserve_body_bytes(request, len(chunk))
                chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)", close_connection=True
        ) from None
    finally:
        chunks.clear()  # a refused body's pieces are not kept alive by the exception's traceback


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {settings.max_images_per_request}")


async def _pieces(body: bytes, size: int = 1 << 20) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def _multipart(request: Request, settings: Settings) -> list[bytes]:
    # The body is read whole and bounded first: the parser, fed from the request itself, would spool any
    # amount of a chunked upload to disk before its size could be checked.
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    parser = MultiPartParser(
        request.headers, _pieces(body), max_files=settings.max_images_per_request + 1, max_fields=100
    )
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
    if media_type in RAW_MEDIA_TYPES:
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if not body:
            raise InvalidImage("request body is empty")
        return [body]
    raise UnsupportedMediaType(
        f"content type {media_type or '(none)'!r} is not supported; send an image (image/jpeg, image/png, "
        "image/webp, image/bmp or image/gif), "
        "multipart/form-data with 'image' file fields, or application/json with base64 'images'"
    )
