"""The canary's guard rails with fixed numbers, the halt and what it routes, the stable version answering what
the canary failed, and the shadow comparisons: counted, dropped when busy, skipped for a reference model that
takes other inputs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import numpy as np
import pytest

from server.errors import BadRequest, ModelNotFound, TritonFailed
from server.metrics import GatewayMetrics
from server.preprocess import PreprocessSpec
from server.rollout import Guard, Reference, Rollout
from server.shadow import CanaryWatch, Windows, broken_rail, compare
from server.triton import Inference, ModelInfo

MODEL = "digits"
GUARD = Guard(max_error_rate=0.1, max_p99_ratio=2.0, min_agreement=0.9, min_requests=10)
SPEC = PreprocessSpec(image_size=8, resize_size=8, mean=(0.5,), std=(0.25,), color_mode="L")
INFO = ModelInfo(
    name=MODEL,
    spec=SPEC,
    labels=tuple("0123"),
    input_name="input",
    output_name="logits",
    max_batch_size=8,
    rollout=Rollout(1, 2, 50, shadow_percent=100, guard=GUARD, id="first"),
)
BATCH = np.zeros((2, 1, 8, 8), np.float32)


def windows(**outcomes: list) -> Windows:
    made = Windows(40)
    for name, values in outcomes.items():
        getattr(made, name).extend(values)
    return made


def test_the_error_rate_rail_needs_min_requests_then_breaks_above_its_maximum() -> None:
    assert broken_rail(GUARD, windows(canary_errors=[True] * 9)) is None  # 9 < min_requests
    assert broken_rail(GUARD, windows(canary_errors=[True] + [False] * 9)) is None  # 0.1, not above
    assert broken_rail(GUARD, windows(canary_errors=[True] * 2 + [False] * 8)) == "error_rate"
    assert broken_rail(dataclasses.replace(GUARD, max_error_rate=0), windows(canary_errors=[True] * 10)) is None


def test_the_p99_rail_compares_with_the_stable_versions_p99_once_both_have_min_requests() -> None:
    slow = [0.010] * 20
    assert broken_rail(GUARD, windows(canary_seconds=slow, stable_seconds=[0.004] * 20)) == "p99"  # 2.5 x
    assert broken_rail(GUARD, windows(canary_seconds=slow, stable_seconds=[0.006] * 20)) is None  # 1.67 x
    assert broken_rail(GUARD, windows(canary_seconds=slow, stable_seconds=[0.004] * 9)) is None
    assert broken_rail(dataclasses.replace(GUARD, max_p99_ratio=0), windows(canary_seconds=slow)) is None


def test_the_agreement_rail_breaks_below_its_minimum() -> None:
    assert broken_rail(GUARD, windows(agreement=[True] * 9 + [False])) is None  # 0.9, not below
    assert broken_rail(GUARD, windows(agreement=[True] * 8 + [False] * 2)) == "agreement"
    assert broken_rail(GUARD, windows(agreement=[False] * 9)) is None


def test_compare_gives_top1_agreement_and_the_score_difference_of_the_served_top_class() -> None:
    served = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32))
    other = np.log(np.array([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1]], np.float32))
    agree, difference = compare(served, other)
    assert agree.tolist() == [True, False]
    assert difference == pytest.approx([0.2, 0.5], abs=1e-5)


class Triton:
    """Version 1 ranks the classes 3, 2, 1, 0; version 2 the other way round (it never agrees). Versions in
    `failing` raise `error`; `hold` keeps shadow calls waiting."""

    def __init__(self, failing: tuple[str, ...] = (), error: Exception | None = None) -> None:
        self.failing, self.error = failing, error
        self.asked: list[str] = []
        self.hold: asyncio.Event | None = None
        self.reference = INFO

    async def model_info(self, name: str) -> ModelInfo:
        return self.reference

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        self.asked.append(version or info.name)
        if self.hold is not None:
            await self.hold.wait()
        if version in self.failing:
            raise self.error or TritonFailed("Triton error: boom")
        row = np.arange(4, dtype=np.float32)
        return Inference(np.tile(row[::-1] if version == "2" else row, (len(batch), 1)), version or "1", "bytes")


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": MODEL, **labels})


def test_a_canary_that_never_agrees_is_halted_with_one_log_line_and_a_metric(caplog) -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics, concurrency=64, draw=lambda: 0.0)  # every request goes to the canary
    triton = Triton()

    async def run() -> list[str]:
        answered = []
        for _ in range(10):
            version = watch.route(INFO, {})
            served = await watch.infer(triton, INFO, BATCH, version, None)
            watch.shadow(triton, INFO, BATCH, served, routed=True)
            await asyncio.gather(*watch.running)
            answered.append(served.version)
        return answered

    with caplog.at_level(logging.WARNING, logger="server.shadow"):
        answered = asyncio.run(run())
    # Two images per request: min_requests (10) comparisons after 5 requests, then every request is stable's.
    assert answered == ["2"] * 5 + ["1"] * 5
    assert watch.halted(MODEL) == "agreement"
    assert sample(metrics, "gateway_rollout_canary_halted", version="2", rollout="first", reason="agreement") == 1
    assert sample(metrics, "gateway_shadow_comparisons_total", version="2", against="stable") == 10
    assert sample(metrics, "gateway_shadow_agreements_total", version="2", against="stable") == 0
    # The canary's requests of this rollout, which `rollout --promote` asks for before it promotes.
    assert sample(metrics, "gateway_rollout_canary_requests_total", version="2", rollout="first") == 5
    halts = [r for r in caplog.records if "halted" in r.getMessage()]
    assert len(halts) == 1 and "agreement with the stable version 0.000 < 0.9 over 10 images" in halts[0].getMessage()
    # Halted, nothing is compared any more; and a stable answer is never sent to the canary.
    triton.asked.clear()
    watch.shadow(triton, INFO, BATCH, Inference(np.zeros((2, 4)), "2", "bytes"), routed=True)
    watch.shadow(triton, INFO, BATCH, Inference(np.zeros((2, 4)), "1", "bytes"), routed=True)
    assert not watch.running and triton.asked == []

    # A new `builder rollout --canary` (a new id): the canary serves again.
    again = dataclasses.replace(INFO, rollout=dataclasses.replace(INFO.rollout, id="second"))
    assert watch.route(again, {}) == "2" and watch.halted(MODEL) is None
    assert sample(metrics, "gateway_rollout_canary_halted", version="2", rollout="first", reason="agreement") == 0


def test_what_the_canary_fails_the_stable_version_answers_and_a_refused_input_is_not_retried() -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics)
    triton = Triton(failing=("2",))
    answer = asyncio.run(watch.infer(triton, INFO, BATCH, "2", None))
    assert answer.version == "1" and triton.asked == ["2", "1"]
    assert sample(metrics, "gateway_rollout_canary_retries_total", version="2") == 1
    assert list(watch.watched[MODEL].windows.canary_errors) == [True]
    # The client's bad input fails on the canary as it would on the stable version: answered as it is.
    refusing = Triton(failing=("2",), error=BadRequest("the model refused the input: bad"))
    with pytest.raises(BadRequest):
        asyncio.run(watch.infer(refusing, INFO, BATCH, "2", None))
    assert refusing.asked == ["2"]
    # The stable version's own failure is the client's answer.
    with pytest.raises(TritonFailed):
        asyncio.run(watch.infer(Triton(failing=("1",)), INFO, BATCH, "1", None))


def test_shadow_requests_past_the_concurrency_are_dropped_and_counted() -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics, concurrency=2, draw=lambda: 0.0)
    triton = Triton()

    async def run() -> None:
        triton.hold = asyncio.Event()  # shadow calls stay in flight until released
        served = Inference(np.zeros((2, 4), np.float32), "2", "bytes")
        for _ in range(5):
            watch.shadow(triton, INFO, BATCH, served, routed=True)
        await asyncio.sleep(0)
        assert len(watch.running) == 2
        triton.hold.set()
        await asyncio.gather(*watch.running)

    asyncio.run(run())
    assert sample(metrics, "gateway_shadow_skipped_total", reason="busy") == 3
    assert sample(metrics, "gateway_shadow_comparisons_total", version="2", against="stable") == 4


def test_a_reference_model_with_other_preprocessing_is_skipped_and_said_once(caplog) -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics, draw=lambda: 0.0)
    info = dataclasses.replace(INFO, rollout=None, reference=Reference("digits-fp32", 100))
    triton = Triton()
    triton.reference = dataclasses.replace(INFO, name="digits-fp32", spec=dataclasses.replace(SPEC, mean=(0.4,)))
    served = Inference(np.tile(np.arange(4, dtype=np.float32), (2, 1)), "1", "bytes")

    async def run() -> None:
        for _ in range(3):
            watch.shadow(triton, info, BATCH, served, routed=False)
            await asyncio.gather(*watch.running)

    with caplog.at_level(logging.WARNING, logger="server.shadow"):
        asyncio.run(run())
    assert sample(metrics, "gateway_shadow_skipped_total", reason="reference_mismatch") == 3
    assert len([r for r in caplog.records if "takes other inputs" in r.getMessage()]) == 1
    # The same spec: compared, under the version that answered.
    triton.reference = dataclasses.replace(INFO, name="digits-fp32")
    asyncio.run(run())
    assert sample(metrics, "gateway_shadow_comparisons_total", version="1", against="reference") == 6
    assert sample(metrics, "gateway_shadow_agreements_total", version="1", against="reference") == 6


class NoReference(Triton):
    async def model_info(self, name: str) -> ModelInfo:
        self.asked.append(f"config of {name}")
        raise ModelNotFound(f"model {name!r} is not served")


def test_a_missing_reference_model_is_said_once_and_not_asked_for_on_every_request(caplog) -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics, draw=lambda: 0.0)
    info = dataclasses.replace(INFO, rollout=None, reference=Reference("nosuch", 100))
    triton = NoReference()
    served = Inference(np.tile(np.arange(4, dtype=np.float32), (2, 1)), "1", "bytes")

    async def run() -> None:
        for _ in range(3):
            watch.shadow(triton, info, BATCH, served, routed=False)
            await asyncio.gather(*watch.running)

    with caplog.at_level(logging.WARNING, logger="server.shadow"):
        asyncio.run(run())
    assert sample(metrics, "gateway_shadow_skipped_total", reason="error") == 3
    assert triton.asked == ["config of nosuch"]
    assert [r.getMessage() for r in caplog.records] == [
        "model 'digits': reference model 'nosuch': model 'nosuch' is not served: not compared with it"
    ]


def test_the_p99_rail_compares_stable_times_from_the_same_moments_as_the_canarys() -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics)
    info = dataclasses.replace(INFO, rollout=dataclasses.replace(INFO.rollout, canary_percent=10))
    # A slow spell of the machine for both versions, then a long normal one, where the stable version answers
    # nine requests in ten.
    for _ in range(10):
        watch.record(info, "2", 0.010, failed=False)
        watch.record(info, "1", 0.010, failed=False)
    for _ in range(10):
        watch.record(info, "2", 0.002, failed=False)
        for _ in range(9):
            watch.record(info, "1", 0.002, failed=False)
    # The last 40 stable times alone would all be normal ones, against the canary's slow spell.
    assert watch.halted(MODEL) is None
    assert len(watch.watched[MODEL].windows.stable_seconds) == 20


def test_a_failing_shadow_call_is_counted_and_changes_nothing_else() -> None:
    metrics = GatewayMetrics()
    watch = CanaryWatch(metrics, draw=lambda: 0.0)  # routed to the canary, shadowed to the stable version
    info = INFO
    triton = Triton(failing=("1",))

    async def run() -> Inference:
        served = await watch.infer(triton, info, BATCH, watch.route(info, {}), None)
        watch.shadow(triton, info, BATCH, served, routed=True)
        await asyncio.gather(*watch.running)
        return served

    assert asyncio.run(run()).version == "2" and triton.asked == ["2", "1"]
    assert sample(metrics, "gateway_shadow_skipped_total", reason="error") == 1
    assert sample(metrics, "gateway_shadow_comparisons_total", version="2", against="stable") is None
    assert watch.halted(MODEL) is None and list(watch.watched[MODEL].windows.canary_errors) == [False]
