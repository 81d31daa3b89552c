"""The images of a classification request: a raw image body, multipart `image` fields, or JSON base64."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from .errors import BadRequest, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from .settings import Settings

RAW_MEDIA_TYPES = ("image/", "application/octet-stream")


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it passes `limit` bytes (chunked uploads included)."""
    _check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {settings.max_images_per_request}")


async def _multipart(request: Request, settings: Settings) -> list[bytes]:
    _check_declared_length(request, settings.max_body_bytes)
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=100)
    except ClientDisconnect:
        raise  # not a broken body: the client left (app.py answers 499)
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
    if sum(len(i) for i in images) > settings.max_body_bytes:
        raise PayloadTooLarge(f"images exceed the limit of {settings.max_body_bytes} bytes")
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
    body = await read_body(request, settings.max_body_bytes)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise BadRequest('JSON body must be {"images": ["<base64>", ...]} with at least one image')
    _check_count(len(images), settings)
    return [_decode_base64(i, text) for i, text in enumerate(images)]


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """Encoded images, in request order; a 4xx GatewayError for anything else."""
    media_type = media_type_of(request)
    if media_type == "multipart/form-data":
        return await _multipart(request, settings)
    if media_type == "application/json":
        return await _json(request, settings)
    if media_type.startswith(RAW_MEDIA_TYPES):
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise InvalidImage("request body is empty")
        return [body]
    raise UnsupportedMediaType(
        f"content type {media_type or '(none)'!r} is not supported; send an image (image/jpeg, image/png, ...), "
        "multipart/form-data with 'image' file fields, or application/json with base64 'images'"
    )
