"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import GatewayError

# Read by FastAPI only to document the scheme in OpenAPI (and offer "Authorize" in /docs); the check
# below reads the header itself.
bearer_scheme = HTTPBearer(auto_error=False, description="one of the gateway's API keys, where it has any")


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


def check_api_key(request: Request) -> None:
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


async def require_api_key(
    request: Request,
    _: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> None:
    check_api_key(request)


async def require_key_for_docs(request: Request) -> None:
    if request.app.state.settings.docs_require_key:
        check_api_key(request)


async def require_key_for_metrics(request: Request) -> None:
    if request.app.state.settings.metrics_require_key:
        check_api_key(request)
