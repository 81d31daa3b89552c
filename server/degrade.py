"""Graceful degradation: under overload a model's requests are answered by a faster model of its family.

The setting is part of the slow model's config.pbtxt (`parameters`, written by `builder degrade`), read
through Triton's model-config API like the rollout, so every gateway follows the repository. It names the
faster model, how many of this model's requests may be in flight in one gateway worker before the next one
goes to the faster model, and how many the faster model may have in flight before a request is refused
with 429 instead. Both models take one preprocessing spec and one label list (checked by the CLI and again
here), so a request is preprocessed once, whichever model answers it.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RETRY_AFTER_S, GatewayError, TooManyRequests

if TYPE_CHECKING:  # imported for their types only: server.triton and server.deps import this module
    from .deps import Admission
    from .metrics import GatewayMetrics
    from .replicas import ReplicaPool
    from .triton import ModelInfo

log = logging.getLogger(__name__)

# The gateway's default config lifetime (GATEWAY_MODEL_INFO_TTL_S), for a pool that does not say its own.
DEFAULT_INFO_TTL_S = 5.0

PARAMETER_PREFIX = "degrade."
TO = "degrade.to"
IN_FLIGHT = "degrade.in_flight"
TO_IN_FLIGHT = "degrade.to_in_flight"
# Top-1 points the faster model loses against this one, from both models' recorded validation accuracy
# (informational: shown on /v1/models/NAME; absent where a lineage has none).
ACCURACY_COST = "degrade.accuracy_cost"


@dataclass(frozen=True)
class Degrade:
    """Past `in_flight` requests of this model in flight, the next goes to model `to`, unless `to` has
    `to_in_flight` requests in flight itself: then it is refused with 429."""

    to: str
    in_flight: int
    to_in_flight: int
    accuracy_cost: float | None = None

    def __post_init__(self) -> None:
        if not self.to:
            raise ValueError("no model to degrade to")
        if self.in_flight < 1 or self.to_in_flight < 1:
            raise ValueError("in-flight thresholds are positive integers")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Degrade | None:
        """The setting a config's parameters describe; None when there is none; ValueError if malformed."""
        if TO not in parameters:
            return None
        in_flight = int(parameters[IN_FLIGHT])
        cost = parameters.get(ACCURACY_COST, "")
        return cls(
            to=parameters[TO].strip(),
            in_flight=in_flight,
            to_in_flight=int(parameters.get(TO_IN_FLIGHT, str(in_flight))),
            # Informational: a value that is no number (nan, inf) is as good as none, and JSON has no NaN.
            accuracy_cost=float(cost) if cost and math.isfinite(float(cost)) else None,
        )

    def to_parameters(self) -> dict[str, str]:
        parameters = {TO: self.to, IN_FLIGHT: str(self.in_flight), TO_IN_FLIGHT: str(self.to_in_flight)}
        if self.accuracy_cost is not None:
            parameters[ACCURACY_COST] = f"{self.accuracy_cost:.4g}"
        return parameters


def parse(name: str, parameters: Mapping[str, str]) -> Degrade | None:
    """As `Degrade.from_parameters`, except that a setting the gateway cannot follow (hand-edited) is logged
    and ignored: the model keeps serving on its own."""
    try:
        degrade = Degrade.from_parameters(parameters)
    except (KeyError, ValueError) as e:
        log.warning("model %r: ignoring its degrade parameters: %s", name, e)
        return None
    if degrade is not None and degrade.to == name:
        log.warning("model %r: ignoring its degrade parameters: it names the model itself", name)
        return None
    return degrade


class ModelsInFlight:
    """Classifications in flight in this gateway worker, per model that answers them. The event loop is the
    only thread that touches the counts, so no lock is needed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def answerer(self, model: str, degrade: Degrade | None, pinned: bool) -> str:
        """The model that answers a new request for `model`: itself, or the faster one while `model` is past
        its threshold. A pinned version is never degraded. TooManyRequests when the faster model is past its
        own limit too."""
        if degrade is None or pinned or self.counts[model] < degrade.in_flight:
            return model
        if self.counts[degrade.to] >= degrade.to_in_flight:
            raise TooManyRequests(
                f"model {model!r} and its faster variant {degrade.to!r} are at capacity; retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        return degrade.to

    def release(self, model: str) -> None:
        self.counts[model] -= 1
        if self.counts[model] <= 0:
            del self.counts[model]


def compatible(slow: ModelInfo, fast: ModelInfo) -> bool:
    """Whether a batch made for `slow` can be sent to `fast` and its answer read with `slow`'s labels."""
    return (
        fast.spec == slow.spec
        and fast.labels == slow.labels
        and fast.pixel_input == slow.pixel_input
        # The batch is split by the answering model's max batch size; a model without batching takes its own.
        and fast.fixed_batch == slow.fixed_batch
    )


async def answering_model(
    triton: ReplicaPool,
    info: ModelInfo,
    pinned: str,
    admission: Admission,
    metrics: GatewayMetrics,
    context: dict[str, Any],
) -> ModelInfo:
    """The model that answers this classification, counted in flight for it until the answer: `info`'s own,
    or the faster model of its degrade setting while `info`'s model is past its threshold."""
    models = admission.slots.models
    chosen = models.answerer(info.name, info.degrade, bool(pinned))
    if chosen != info.name:
        fast = await _fast_model(triton, info, chosen)
        if fast is not None:
            metrics.degraded_requests.labels(info.name, chosen).inc()
            context["degraded_to"] = chosen
            admission.hold_model(chosen)
            return fast
    admission.hold_model(info.name)
    return info


class NamedModels:
    """Configs of the models a model names beside itself (its degrade target, its reference model), for one
    ReplicaPool. A lookup that failed is not repeated for the pool's config lifetime (`info_ttl_s`): a missing
    model would otherwise cost a call to Triton on every request. Each (model, other model, problem) is
    logged once per process."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.failed: dict[str, tuple[float, GatewayError]] = {}
        self.told: set[tuple[str, str, str]] = set()

    async def info(self, triton: Any, name: str) -> ModelInfo:
        failed = self.failed.get(name)
        if failed is not None and time.monotonic() - failed[0] < self.ttl_s:
            raise failed[1]
        try:
            info = await triton.model_info(name)
        except GatewayError as e:
            self.failed[name] = (time.monotonic(), e)
            raise
        self.failed.pop(name, None)
        return info

    def warn_once(self, logger: logging.Logger, model: str, other: str, problem: str) -> None:
        if (model, other, problem) not in self.told:
            self.told.add((model, other, problem))
            logger.warning("model %r: %s", model, problem)


# One per ReplicaPool (a gateway worker has one; in-process tests make many).
_named_models: weakref.WeakKeyDictionary[Any, NamedModels] = weakref.WeakKeyDictionary()


def named_models(triton: Any) -> NamedModels:
    found = _named_models.get(triton)
    if found is None:
        found = _named_models[triton] = NamedModels(getattr(triton, "info_ttl_s", DEFAULT_INFO_TTL_S))
    return found


async def _fast_model(triton: ReplicaPool, info: ModelInfo, name: str) -> ModelInfo | None:
    """The faster model's config, where it can take this model's batches; None (the model answers on its
    own) where it is not served or has been republished with another interface since the setting."""
    models = named_models(triton)
    try:
        fast = await models.info(triton, name)
    except GatewayError as e:
        models.warn_once(log, info.name, name, f"cannot degrade to {name!r}: {e}")
        return None
    if not compatible(info, fast):
        models.warn_once(log, info.name, name, f"cannot degrade to {name!r}: its preprocessing, labels or input differ")
        return None
    return fast


def answer_fields(name: str, answered_by: ModelInfo, version: str) -> dict[str, Any]:
    """What a classification's answer says about a faster model that answered it; nothing otherwise."""
    if answered_by.name == name:
        return {}
    return {"degraded": True, "answered_by": {"model": answered_by.name, "version": version}}
