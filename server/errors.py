"""Errors the gateway answers on purpose, each with its HTTP status and a stable code."""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class InvalidImage(GatewayError):
    status, code = 400, "invalid_image"


class ModelNotFound(GatewayError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class TooManyRequests(GatewayError):
    status, code = 429, "too_many_requests"


class TritonUnavailable(GatewayError):
    status, code = 503, "triton_unavailable"


class TritonTimeout(GatewayError):
    status, code = 504, "triton_timeout"


class TritonFailed(GatewayError):
    """Triton answered with an error that is not the client's fault."""

    status, code = 502, "triton_error"
