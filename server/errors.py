"""Errors the gateway answers on purpose, each with its HTTP status and a stable code."""

from __future__ import annotations

# Seconds a client is told to wait (Retry-After) before it tries again after a 429, 503 or 504.
RETRY_AFTER_S = 1


class GatewayError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None, close_connection: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        # Answered before the body was read to its end: the connection cannot carry another request, and
        # closing it stops the rest of the body from coming.
        self.close_connection = close_connection

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        return {**headers, "Connection": "close"} if self.close_connection else headers


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class InvalidImage(GatewayError):
    status, code = 400, "invalid_image"


class RequestTimeout(GatewayError):
    status, code = 408, "request_timeout"


class ModelNotFound(GatewayError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class TooManyRequests(GatewayError):
    status, code = 429, "too_many_requests"


class RefusedByTriton(GatewayError):
    """Triton refused the request as the client's mistake (a malformed tensor, a wrong shape)."""

    code = "refused_by_triton"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TritonUnavailable(GatewayError):
    status, code = 503, "triton_unavailable"


class Draining(GatewayError):
    """The gateway is shutting down: another replica (or this one, restarted) takes the request."""

    status, code = 503, "draining"


class TritonTimeout(GatewayError):
    status, code = 504, "triton_timeout"


class TritonFailed(GatewayError):
    """Triton answered with an error that is not the client's fault."""

    status, code = 502, "triton_error"
