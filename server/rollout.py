"""Canary rollouts: which version of a model answers a request.

The rollout is part of the model's config.pbtxt (`parameters`, written by `builder rollout`), which the
gateway reads through Triton's model-config API like the preprocessing spec. Every gateway replica
therefore follows the repository with no control plane of its own, and a restart loses nothing.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

PARAMETER_PREFIX = "rollout."
STABLE = "rollout.stable"
CANARY = "rollout.canary"
CANARY_PERCENT = "rollout.canary_percent"
STICKY_HEADER = "rollout.sticky_header"
# Which rollout this is: written afresh by every `builder rollout --canary`, so a gateway that halted the
# canary of one rollout serves the canary of the next one again (server/shadow.py keys its state by it).
ROLLOUT_ID = "rollout.id"
SHADOW_PERCENT = "rollout.shadow_percent"
MAX_ERROR_RATE = "rollout.max_error_rate"
MAX_P99_RATIO = "rollout.max_p99_ratio"
MIN_AGREEMENT = "rollout.min_agreement"
MIN_REQUESTS = "rollout.min_requests"
# A model to compare every served version with (its answers are never served), and the share of classify
# requests sent to it too; parameters of the model's own config, kept across rollouts.
REFERENCE_PREFIX = "reference."
REFERENCE_MODEL = f"{REFERENCE_PREFIX}model"
REFERENCE_PERCENT = f"{REFERENCE_PREFIX}shadow_percent"
# Every canary answer is checked by default: the stable version answers the canary's share once more.
DEFAULT_SHADOW_PERCENT = 100.0
DEFAULT_REFERENCE_PERCENT = 10.0
# Triton reads a version as an int64; a larger number in a hand-edited config is not a version.
MAX_VERSION = 2**63 - 1
# Far beyond any header name in use, far below what proxies refuse.
MAX_HEADER_NAME = 128


@dataclass(frozen=True)
class Guard:
    """When a gateway stops routing to a canary: over its last requests (at least `min_requests` of them),
    an error rate above `max_error_rate`, a p99 inference time above `max_p99_ratio` times the stable
    version's, or top-1 agreement with the stable version below `min_agreement`. A rail at 0 is off (an
    error rate of 1 cannot be exceeded either)."""

    max_error_rate: float = 0.05
    max_p99_ratio: float = 2.0
    min_agreement: float = 0.9
    min_requests: int = 50

    def __post_init__(self) -> None:
        for name in ("max_error_rate", "min_agreement"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{name} {value:g} is not between 0 and 1")
        if not (math.isfinite(self.max_p99_ratio) and (self.max_p99_ratio == 0 or self.max_p99_ratio >= 1)):
            raise ValueError(f"max_p99_ratio {self.max_p99_ratio:g} is neither 0 (off) nor at least 1")
        if not 1 <= self.min_requests <= MAX_MIN_REQUESTS:
            raise ValueError(f"min_requests {self.min_requests} is not between 1 and {MAX_MIN_REQUESTS}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Guard | None:
        """None where the config names no rail (a rollout written before guards): nothing is judged."""
        if not any(key in parameters for key in GUARD_PARAMETERS.values()):
            return None
        defaults = cls()
        return cls(
            max_error_rate=float(parameters.get(MAX_ERROR_RATE, defaults.max_error_rate)),
            max_p99_ratio=float(parameters.get(MAX_P99_RATIO, defaults.max_p99_ratio)),
            min_agreement=float(parameters.get(MIN_AGREEMENT, defaults.min_agreement)),
            min_requests=int(parameters.get(MIN_REQUESTS, defaults.min_requests)),
        )

    def to_parameters(self) -> dict[str, str]:
        return {GUARD_PARAMETERS[name]: f"{getattr(self, name):g}" for name in GUARD_PARAMETERS}


# Far beyond a useful window (server/shadow.py keeps 4 x min_requests outcomes per version).
MAX_MIN_REQUESTS = 100_000
GUARD_PARAMETERS = {
    "max_error_rate": MAX_ERROR_RATE,
    "max_p99_ratio": MAX_P99_RATIO,
    "min_agreement": MIN_AGREEMENT,
    "min_requests": MIN_REQUESTS,
}


def version_of(parameters: Mapping[str, str], key: str) -> int | None:
    """The version `key` (STABLE, CANARY) names, where it reads as one; else None. A rollout whose other
    values are unreadable still says which version to fall back on (the gateway) or to keep (`builder`)."""
    try:
        version = int(parameters.get(key, ""))
    except ValueError:
        return None
    return version if 1 <= version <= MAX_VERSION else None


def new_rollout_id() -> str:
    return uuid.uuid4().hex[:12]


def new_rollout(stable: int, canary: int, percent: float, **settings) -> Rollout:
    """A rollout starting now, with the default shadow share and guard rails unless `settings` say otherwise."""
    settings.setdefault("shadow_percent", DEFAULT_SHADOW_PERCENT)
    settings.setdefault("guard", Guard())
    return Rollout(stable, canary, percent, id=new_rollout_id(), **settings)


def _percent(value: float, what: str) -> None:
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise ValueError(f"{what} {value:g} is not between 0 and 100")


@dataclass(frozen=True)
class Reference:
    """A model every served version is compared with on `percent` of classify requests."""

    model: str
    percent: float = DEFAULT_REFERENCE_PERCENT

    def __post_init__(self) -> None:
        _percent(self.percent, "the reference's shadow percentage")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Reference | None:
        model = parameters.get(REFERENCE_MODEL, "").strip()
        if not model:
            return None
        return cls(model, float(parameters.get(REFERENCE_PERCENT, DEFAULT_REFERENCE_PERCENT)))

    def to_parameters(self) -> dict[str, str]:
        return {REFERENCE_MODEL: self.model, REFERENCE_PERCENT: f"{self.percent:g}"}


@dataclass(frozen=True)
class Rollout:
    """Version `canary` serves `canary_percent` of requests, version `stable` the rest."""

    stable: int
    canary: int
    canary_percent: float
    # A request header (lower case) whose value decides the version, so one client sees one version;
    # empty: every request is drawn on its own.
    sticky_header: str = ""
    # The share of the canary's routed classifications also sent to the stable version, to compare answers.
    shadow_percent: float = 0.0
    guard: Guard | None = field(default=None)
    id: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.canary_percent <= 100:
            raise ValueError(f"canary percentage {self.canary_percent} is not between 0 and 100")
        _percent(self.shadow_percent, "the shadow percentage")
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
            shadow_percent=float(parameters.get(SHADOW_PERCENT, "0")),
            guard=Guard.from_parameters(parameters),
            id=parameters.get(ROLLOUT_ID, "").strip(),
        )

    def to_parameters(self) -> dict[str, str]:
        parameters = {
            STABLE: str(self.stable),
            CANARY: str(self.canary),
            CANARY_PERCENT: f"{self.canary_percent:g}",
        }
        if self.sticky_header:
            parameters[STICKY_HEADER] = self.sticky_header
        if self.shadow_percent:
            parameters[SHADOW_PERCENT] = f"{self.shadow_percent:g}"
        if self.guard is not None:
            parameters.update(self.guard.to_parameters())
        if self.id:
            parameters[ROLLOUT_ID] = self.id
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
