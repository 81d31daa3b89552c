"""Canary rollouts: which version of a model answers a request.

The rollout is part of the model's config.pbtxt (`parameters`, written by `builder rollout`), which the
gateway reads through Triton's model-config API like the preprocessing spec. Every gateway replica
therefore follows the repository with no control plane of its own, and a restart loses nothing.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PARAMETER_PREFIX = "rollout."
STABLE = "rollout.stable"
CANARY = "rollout.canary"
CANARY_PERCENT = "rollout.canary_percent"
STICKY_HEADER = "rollout.sticky_header"
# Triton reads a version as an int64; a larger number in a hand-edited config is not a version.
MAX_VERSION = 2**63 - 1
# Far beyond any header name in use, far below what proxies refuse.
MAX_HEADER_NAME = 128


@dataclass(frozen=True)
class Rollout:
    """Version `canary` serves `canary_percent` of requests, version `stable` the rest."""

    stable: int
    canary: int
    canary_percent: float
    # A request header (lower case) whose value decides the version, so one client sees one version;
    # empty: every request is drawn on its own.
    sticky_header: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.canary_percent <= 100:
            raise ValueError(f"canary percentage {self.canary_percent} is not between 0 and 100")
        if self.stable == self.canary:
            raise ValueError(f"the canary and the stable version are both {self.stable}")
        if self.stable < 1 or self.canary < 1:
            raise ValueError("versions are positive integers")
        if max(self.stable, self.canary) > MAX_VERSION:
            raise ValueError(f"versions are at most {MAX_VERSION} (Triton's int64)")
        if len(self.sticky_header) > MAX_HEADER_NAME:
            raise ValueError(f"the sticky header's name is longer than {MAX_HEADER_NAME} characters")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Rollout | None:
        """The rollout a config's parameters describe; None when there is none; ValueError if malformed."""
        if CANARY not in parameters and STABLE not in parameters:
            return None
        return cls(
            stable=int(parameters[STABLE]),
            canary=int(parameters[CANARY]),
            canary_percent=float(parameters.get(CANARY_PERCENT, "0")),
            sticky_header=parameters.get(STICKY_HEADER, "").strip().lower(),
        )

    def to_parameters(self) -> dict[str, str]:
        parameters = {
            STABLE: str(self.stable),
            CANARY: str(self.canary),
            CANARY_PERCENT: f"{self.canary_percent:g}",
        }
        if self.sticky_header:
            parameters[STICKY_HEADER] = self.sticky_header
        return parameters

    @property
    def versions(self) -> tuple[int, int]:
        return (self.stable, self.canary)

    def choose(self, sticky_value: str | None = None, draw: Callable[[], float] = random.random) -> int:
        """The version for one request: by a hash of `sticky_value` where the rollout is sticky and the
        request carries one, else by `draw()` (uniform in [0, 1))."""
        if self.sticky_header and sticky_value:
            # The first 8 bytes of SHA-256 as a fraction of 2**64: stable across processes and replicas,
            # unlike Python's salted hash().
            digest = hashlib.sha256(sticky_value.encode("utf-8", "surrogateescape")).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = draw()
        return self.canary if point * 100 < self.canary_percent else self.stable
