"""Watching a canary on live traffic: shadow comparisons without labels, guard rails, automatic halt.

A share of the canary's answers (the rollout's `shadow_percent`) is checked by sending the same request, in
the background, to the stable version, and a share (`reference.shadow_percent`) to the model's reference model: the
two answers to the same preprocessed tensor are compared (top-1 agreement, and how far apart the scores
for the served top-1 class are). A shadow call never delays nor fails the client's answer: it starts once
the answer is in hand, runs on a copy of the tensor, and is dropped (and counted) when `concurrency` are
already running.

Each gateway process judges the canary on its own traffic, over a sliding window of the last requests per
version (`Guard`: error rate, p99 inference time against the stable version's, agreement with the stable
version). Once a rail is broken the canary gets no more requests from this process, which logs one line and
sets `gateway_rollout_canary_halted`. The halt belongs to the rollout as the config describes it (its
`rollout.id` among the rest): it lasts until `builder rollout` writes another rollout, which starts afresh.
A request the canary fails (a Triton error, never a refusal of the client's input) is answered by the stable
version instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .degrade import named_models
from .errors import GatewayError, TooManyRequests, TritonFailed, TritonTimeout, TritonUnavailable
from .metrics import GatewayMetrics
from .rollout import Guard, Rollout
from .shared_memory import Slot
from .triton import Inference, ModelInfo

log = logging.getLogger("server.shadow")

# Failures of the version itself, which the other version may not share; a refusal of the client's input
# (BadRequest) or a version gone from Triton (handled by re-routing in server/routes.py) are not among them.
# TritonUnavailable counts only where the stable version then answers (see CanaryWatch.infer).
CANARY_FAILURES = (TritonFailed, TritonTimeout, TritonUnavailable, TooManyRequests)
# Outcomes kept per version: this many times the guard's minimum number of requests.
WINDOW_FACTOR = 4


class Inferring(Protocol):
    async def infer(
        self, info: ModelInfo, batch: np.ndarray, version: str = "", slot: Slot | None = None
    ) -> Inference: ...

    async def model_info(self, name: str) -> ModelInfo: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def compare(served: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether the top-1 classes agree, and |score difference| for the served answer's top-1."""
    top = served.argmax(axis=1)
    agree = top == other.argmax(axis=1)
    rows = np.arange(len(top))
    difference = np.abs(softmax(served)[rows, top] - softmax(other)[rows, top])
    return agree, difference


def _p99(values: deque[float]) -> float:
    return float(np.percentile(np.fromiter(values, float), 99))


@dataclass
class Windows:
    """The last outcomes of one rollout in this process."""

    size: int
    canary_errors: deque[bool] = field(init=False)
    canary_seconds: deque[float] = field(init=False)
    stable_seconds: deque[float] = field(init=False)
    agreement: deque[bool] = field(init=False)
    # Canary times not yet matched with a stable one (see CanaryWatch.record).
    stable_wanted: int = 0

    def __post_init__(self) -> None:
        self.canary_errors = deque(maxlen=self.size)
        self.canary_seconds = deque(maxlen=self.size)
        self.stable_seconds = deque(maxlen=self.size)
        self.agreement = deque(maxlen=self.size)


def broken_rail(guard: Guard, windows: Windows) -> str | None:
    """The first rail the canary breaks, as a short reason ("error_rate", "p99", "agreement"), else None.
    Each is judged only once it has `min_requests` outcomes (the p99 on both versions)."""
    enough = guard.min_requests
    errors = windows.canary_errors
    if guard.max_error_rate and len(errors) >= enough and sum(errors) / len(errors) > guard.max_error_rate:
        return "error_rate"
    canary, stable = windows.canary_seconds, windows.stable_seconds
    if guard.max_p99_ratio and len(canary) >= enough and len(stable) >= enough:
        if _p99(canary) > guard.max_p99_ratio * _p99(stable):
            return "p99"
    agreement = windows.agreement
    if guard.min_agreement and len(agreement) >= enough and sum(agreement) / len(agreement) < guard.min_agreement:
        return "agreement"
    return None


def describe(reason: str, guard: Guard, windows: Windows) -> str:
    if reason == "error_rate":
        errors = windows.canary_errors
        return f"error rate {sum(errors) / len(errors):.3f} > {guard.max_error_rate:g} over {len(errors)} requests"
    if reason == "p99":
        canary, stable = _p99(windows.canary_seconds), _p99(windows.stable_seconds)
        return (
            f"p99 {canary * 1000:.1f} ms > {guard.max_p99_ratio:g} x the stable version's {stable * 1000:.1f} ms "
            f"over {len(windows.canary_seconds)} requests"
        )
    agreement = windows.agreement
    return (
        f"top-1 agreement with the stable version {sum(agreement) / len(agreement):.3f} < "
        f"{guard.min_agreement:g} over {len(agreement)} images"
    )


@dataclass
class Watched:
    """One model's rollout as this process last saw it, its windows, and why its canary was halted."""

    rollout: Rollout
    windows: Windows
    halted: str | None = None


class CanaryWatch:
    """The rollout state of every model in this gateway process (see the module's docstring)."""

    def __init__(
        self, metrics: GatewayMetrics, concurrency: int = 4, draw: Callable[[], float] = random.random
    ) -> None:
        self.metrics, self.concurrency, self.draw = metrics, concurrency, draw
        self.watched: dict[str, Watched] = {}
        self.running: set[asyncio.Task] = set()

    # Routing and the guard rails.

    def _state(self, name: str, rollout: Rollout) -> Watched:
        state = self.watched.get(name)
        if state is None or state.rollout != rollout:
            if state is not None and state.halted:
                # Another rollout (or the same one rewritten): its canary is served again.
                self.metrics.canary_halted.labels(name, str(state.rollout.canary), state.rollout.id, state.halted).set(
                    0
                )
            guard = rollout.guard or Guard()
            state = Watched(rollout, Windows(guard.min_requests * WINDOW_FACTOR))
            self.watched[name] = state
        return state

    def route(self, info: ModelInfo, headers: Mapping[str, str]) -> str:
        """The version for a request the client did not pin: the rollout's draw, the stable version once
        the canary is halted; without a rollout, the newest version the config names (else Triton's choice)."""
        rollout = info.rollout
        if rollout is None:
            # While Triton reloads a model for a new config it serves with the old one, whose newest version
            # may be the canary an abort just removed: the config's own version is asked for by name.
            return str(max(info.specific_versions)) if info.specific_versions else ""
        if self._state(info.name, rollout).halted:
            return str(rollout.stable)
        sticky = headers.get(rollout.sticky_header) if rollout.sticky_header else None
        return str(rollout.choose(sticky, self.draw))

    def halted(self, name: str) -> str | None:
        state = self.watched.get(name)
        return state.halted if state else None

    def _judge(self, name: str, state: Watched) -> None:
        guard = state.rollout.guard
        if guard is None or state.halted:
            return
        reason = broken_rail(guard, state.windows)
        if reason is None:
            return
        state.halted = reason
        canary = str(state.rollout.canary)
        self.metrics.canary_halted.labels(name, canary, state.rollout.id, reason).set(1)
        log.warning(
            "model %r: canary version %s halted, version %s serves every request: %s",
            name,
            canary,
            state.rollout.stable,
            describe(reason, guard, state.windows),
            extra={"fields": {"model": name, "version": canary, "halted": reason}},
        )

    def record(self, info: ModelInfo, version: str, seconds: float, failed: bool) -> None:
        """One routed inference of `version` and how long Triton took (a failure: only counted)."""
        rollout = info.rollout
        if rollout is None:
            return
        state = self._state(info.name, rollout)
        windows = state.windows
        if version == str(rollout.canary):
            self.metrics.canary_requests.labels(info.name, version, rollout.id).inc()
            windows.canary_errors.append(failed)
            if not failed:
                windows.canary_seconds.append(seconds)
                windows.stable_wanted += 1
        elif version == str(rollout.stable) and not failed:
            # One stable time per canary time, the next one after it: both windows cover the same moments
            # and hold as many samples, so the machine's own hiccups weigh the same in both p99s (at a 10%
            # share, the last N stable times would span a tenth of the canary's period).
            if not windows.stable_wanted:
                return
            windows.stable_wanted -= 1
            windows.stable_seconds.append(seconds)
        else:
            return
        self._judge(info.name, state)

    async def infer(
        self, triton: Inferring, info: ModelInfo, batch: np.ndarray, version: str, slot: Slot | None
    ) -> Inference:
        """Triton's answer for a routed request; the canary's failures are recorded and answered by the
        stable version instead."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            inference = await triton.infer(info, batch, version, slot)
        except CANARY_FAILURES as error:
            rollout = info.rollout
            if rollout is None or version != str(rollout.canary):
                raise
            seconds = loop.time() - started
            self.metrics.canary_retries.labels(info.name, version).inc()
            if not isinstance(error, TritonUnavailable):
                self.record(info, version, seconds, failed=True)
                return await triton.infer(info, batch, str(rollout.stable), slot)
            # Unreachable or not ready: the canary's own failure only if the stable version answers the same
            # request; a Triton outage fails both, raises here and halts nothing.
            inference = await triton.infer(info, batch, str(rollout.stable), slot)
            self.record(info, version, seconds, failed=True)
            return inference
        self.record(info, inference.version, loop.time() - started, failed=False)
        return inference

    # Shadow comparisons.

    def shadow(self, triton: Inferring, info: ModelInfo, batch: np.ndarray, served: Inference, routed: bool) -> None:
        """Compare `served` in the background with the stable version (the canary's routed answers only)
        and with the model's reference, each on its share of requests."""
        rollout, reference = info.rollout, info.reference
        other = ""
        # Only the canary's answers are checked, against the stable version: shadow calls to the canary
        # would queue before its own requests and slow it down (its p99 is judged), the stable version
        # serves most requests anyway.
        if routed and rollout is not None and served.version == str(rollout.canary) and not self.halted(info.name):
            if self.draw() * 100 < rollout.shadow_percent:
                other = str(rollout.stable)
        to_reference = reference is not None and reference.model != info.name and self.draw() * 100 < reference.percent
        wanted = bool(other) + to_reference
        room = max(self.concurrency - len(self.running), 0)
        if wanted > room:
            self.metrics.shadow_skipped.labels(info.name, "busy").inc(wanted - room)
            # The comparison with the other version first: the guard rails need it.
            other, to_reference = (other, False) if room else ("", False)
        if not other and not to_reference:
            return
        # The client's tensor may sit in a shared-memory slot that is reused once the answer is sent.
        tensor = np.array(batch, copy=True)
        if other:
            self._start(self._against_version(triton, info, tensor, served, other))
        if to_reference:
            self._start(self._against_reference(triton, info, tensor, served))

    def _start(self, comparison) -> None:
        task = asyncio.ensure_future(comparison)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _against_version(
        self, triton: Inferring, info: ModelInfo, tensor: np.ndarray, served: Inference, other: str
    ) -> None:
        try:
            answer = await triton.infer(info, tensor, other)
        except GatewayError:
            self.metrics.shadow_skipped.labels(info.name, "error").inc()
            return
        rollout = info.rollout
        assert rollout is not None
        agree, difference = compare(served.logits, answer.logits)
        self._count(info.name, str(rollout.canary), "stable", agree, difference)
        state = self.watched.get(info.name)
        if state is not None and state.rollout == rollout:
            state.windows.agreement.extend(bool(a) for a in agree)
            self._judge(info.name, state)

    async def _against_reference(self, triton: Inferring, info: ModelInfo, tensor: np.ndarray, served: Inference):
        assert info.reference is not None
        name = info.reference.model
        models = named_models(triton)
        try:
            reference = await models.info(triton, name)
        except GatewayError as e:
            models.warn_once(log, info.name, name, f"reference model {name!r}: {e}: not compared with it")
            self.metrics.shadow_skipped.labels(info.name, "error").inc()
            return
        try:
            if reference.spec != info.spec or reference.input_datatype != info.input_datatype:
                models.warn_once(
                    log,
                    info.name,
                    name,
                    f"reference model {name!r} takes other inputs (preprocessing or datatype): not compared with it",
                )
                self.metrics.shadow_skipped.labels(info.name, "reference_mismatch").inc()
                return
            answer = await triton.infer(reference, tensor)
        except GatewayError:
            self.metrics.shadow_skipped.labels(info.name, "error").inc()
            return
        if answer.logits.shape != served.logits.shape:
            self.metrics.shadow_skipped.labels(info.name, "reference_mismatch").inc()
            return
        agree, difference = compare(served.logits, answer.logits)
        self._count(info.name, served.version, "reference", agree, difference)

    def _count(self, name: str, version: str, against: str, agree: np.ndarray, difference: np.ndarray) -> None:
        metrics = self.metrics
        metrics.shadow_comparisons.labels(name, version, against).inc(len(agree))
        metrics.shadow_agreements.labels(name, version, against).inc(int(agree.sum()))
        histogram = metrics.shadow_score_difference.labels(name, version, against)
        for value in difference:
            histogram.observe(float(value))

    async def close(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
