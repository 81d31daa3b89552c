"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import GatewayError


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


async def require_api_key(request: Request) -> None:
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, so the time taken does not tell which key came close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if not matched:
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
