"""Where load may be aimed: loopback addresses only, unless the operator says otherwise."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class TargetRefused(ValueError):
    """The load-test target is not on this machine."""


def host_of(address: str) -> str:
    """The host part of a URL (http://h:p/...) or of a gRPC endpoint (h:p)."""
    return urlsplit(address if "//" in address else f"//{address}").hostname or ""


def require_loopback(address: str, *, allow_remote: bool = False) -> None:
    """Raise TargetRefused unless every address `address` resolves to is a loopback address."""
    if allow_remote:
        return
    host = host_of(address)
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except socket.gaierror as e:
        raise TargetRefused(f"cannot resolve load-test target {address!r}: {e}") from e
    # An address such as fe80::1%eth0 carries a zone after %; the address itself is before it.
    if not resolved or not all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in resolved):
        raise TargetRefused(
            f"load-test target {address!r} is not a loopback address; only a deployment you own may be "
            "load-tested, and then with LOADTEST_ALLOW_REMOTE=1"
        )
