"""What the routes need from the app, as FastAPI dependencies: a route names what it takes in its signature,
and a test replaces any of them through `app.dependency_overrides`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import httpx
from fastapi import Depends, Request

from .degrade import ModelsInFlight
from .drain import Drain
from .errors import RETRY_AFTER_S, Draining, TooManyRequests
from .metrics import GatewayMetrics
from .preprocess import DecodeBudget
from .replicas import ReplicaPool
from .settings import Settings
from .shadow import CanaryWatch
from .shared_memory import InputRegion


class InferenceSlots:
    """Inference requests in the gateway. One counts as in flight from its start (the gauge, and whether a
    request is alone), and holds one of `limit` slots from `take()` on, called once its body is in: a
    client that sends its body slowly holds a connection, never capacity. Past the limit, `take()` refuses
    the request with 429 at once. While the gateway drains, new requests are refused with 503 before their
    body is read."""

    def __init__(self, limit: int, metrics: GatewayMetrics, drain: Drain | None = None) -> None:
        self.limit, self.metrics = limit, metrics
        self.drain = drain or Drain()
        self.in_flight = 0
        self.taken = 0
        # Classifications per answering model (server/degrade.py compares them with its thresholds).
        self.models = ModelsInFlight()

    def admit(self, context: dict[str, Any]) -> Admission:
        context["inference"] = True
        if self.drain.active:
            # Every answer while draining closes its connection (server/app.py): the next try goes elsewhere.
            raise Draining("the gateway is shutting down; retry shortly", retry_after_s=RETRY_AFTER_S)
        return Admission(self)


class Admission:
    """One request's place among the InferenceSlots, for an `async with` around its handling."""

    def __init__(self, slots: InferenceSlots) -> None:
        self.slots = slots
        self.holds_slot = False
        self.model: str | None = None

    async def __aenter__(self) -> Admission:
        self.slots.in_flight += 1
        self.slots.metrics.in_flight.inc()
        return self

    def take(self) -> None:
        slots = self.slots
        if slots.taken >= slots.limit:
            raise TooManyRequests(
                f"the gateway is serving {slots.taken} requests; retry shortly", retry_after_s=RETRY_AFTER_S
            )
        slots.taken += 1
        self.holds_slot = True

    def hold_model(self, model: str) -> None:
        """Counts this request in flight for `model`, the model that answers it, until it is answered."""
        self.slots.models.counts[model] += 1
        self.slots.metrics.model_in_flight.labels(model).inc()
        self.model = model

    async def __aexit__(self, *exc_info) -> None:
        self.slots.in_flight -= 1
        self.slots.metrics.in_flight.dec()
        if self.holds_slot:
            self.slots.taken -= 1
        if self.model is not None:
            self.slots.models.release(self.model)
            self.slots.metrics.model_in_flight.labels(self.model).dec()


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


async def get_replicas(request: Request) -> ReplicaPool:
    return request.app.state.replicas


async def get_triton_proxy(request: Request) -> httpx.AsyncClient:
    return request.app.state.triton_proxy


async def get_preprocess_executor(request: Request) -> ThreadPoolExecutor:
    return request.app.state.preprocess_executor


async def get_input_region(request: Request) -> InputRegion | None:
    return request.app.state.input_region


async def get_decode_budget(request: Request) -> DecodeBudget:
    return request.app.state.decode_budget


async def get_inference_slots(request: Request) -> InferenceSlots:
    return request.app.state.inference_slots


async def get_canary_watch(request: Request) -> CanaryWatch:
    return request.app.state.canary_watch


async def get_drain(request: Request) -> Drain:
    return request.app.state.drain


async def get_request_context(request: Request) -> dict[str, Any]:
    """The request's entry in the middleware's bookkeeping: model, stages, error code (for metrics and logs)."""
    return request.state.context


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
ReplicasDep = Annotated[ReplicaPool, Depends(get_replicas)]
TritonProxyDep = Annotated[httpx.AsyncClient, Depends(get_triton_proxy)]
PreprocessExecutorDep = Annotated[ThreadPoolExecutor, Depends(get_preprocess_executor)]
InputRegionDep = Annotated[InputRegion | None, Depends(get_input_region)]
DecodeBudgetDep = Annotated[DecodeBudget, Depends(get_decode_budget)]
InferenceSlotsDep = Annotated[InferenceSlots, Depends(get_inference_slots)]
DrainDep = Annotated[Drain, Depends(get_drain)]
CanaryWatchDep = Annotated[CanaryWatch, Depends(get_canary_watch)]
RequestContextDep = Annotated[dict[str, Any], Depends(get_request_context)]
