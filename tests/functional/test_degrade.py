"""Graceful degradation against the real stack: with one request of a model held in Triton's queue, the next
is answered by the faster model it names and says so; a pinned version, or a model without the setting, is
not degraded.

The held models batch two requests and wait up to 20 s for the second: the first request stays in flight
until a second one for the same model completes its batch, so nothing depends on timing. They are
published into the session's repository (its Triton polls it) beside `digits`, the faster model here, and
served by one gateway worker of the module's (thresholds count per worker).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from builder import degrade
from builder.publish import PublishSettings, publish

from .conftest import MODEL, metric, start_gateway
from .test_failures import wait_for
from .test_gateway import encoded

HELD, HELD_PLAIN = "digits-held", "digits-held-plain"
HOLD_S = 20  # the batcher's wait for a second request; the gateway waits longer for Triton
IMAGE = encoded("L", "PNG")


@pytest.fixture(scope="module")
def stack(tiny_run, repository, triton, tmp_path_factory):  # noqa: F811  (tiny_run: from the conftest)
    settings = PublishSettings(
        max_batch_size=2, preferred_batch_sizes=(2,), max_queue_delay_us=HOLD_S * 1_000_000, instance_count=1
    )
    for name in (HELD, HELD_PLAIN):
        publish(tiny_run / "model.onnx", repository, name, settings=settings)
    degrade.enable(repository, HELD, MODEL, in_flight=1)
    gateway = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("degrade") / "gateway.log",
        triton.http_url,
        GATEWAY_WORKERS="1",
        GATEWAY_TRITON_TIMEOUT_S=str(2 * HOLD_S),
    )
    try:
        # Triton may load HELD from publish's config before `degrade.enable` rewrites it, then load it again
        # at a later poll: wait for the version that carries the setting.
        assert wait_for(
            lambda: all(_ready(gateway.url, name) for name in (HELD, HELD_PLAIN)) and _degrades(gateway.url), 60
        )
        yield gateway
    finally:
        gateway.stop()


def _ready(url: str, name: str) -> bool:
    details = httpx.get(f"{url}/v1/models/{name}", timeout=10)
    return details.status_code == 200 and details.json()["ready"]


def _degrades(url: str) -> bool:
    return httpx.get(f"{url}/v1/models/{HELD}", timeout=10).json().get("degrade") is not None


def classify(url: str, model: str, query: str = "") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{model}/classify{query}",
        content=IMAGE,
        headers={"Content-Type": "image/png"},
        timeout=3 * HOLD_S,
    )


@contextmanager
def one_held(url: str, model: str) -> Iterator[list[httpx.Response]]:
    """One classification of `model` sent in a thread and counted in flight by the gateway (its gauge says
    when), held by the batcher until the block sends a second one. Yields the list its answer goes to."""
    answered: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answered.append(classify(url, model)))
    sender.start()
    try:
        assert wait_for(lambda: metric(url, "gateway_model_in_flight_requests", model=model) == 1, 15)
        yield answered
    finally:
        sender.join(3 * HOLD_S)


def test_past_its_threshold_a_request_is_answered_by_the_faster_model_and_says_so(stack):
    details = httpx.get(f"{stack.url}/v1/models/{HELD}", timeout=10).json()
    assert details["degrade"]["to"] == MODEL and details["degrade"]["in_flight"] == 1
    with one_held(stack.url, HELD) as first:
        degraded = classify(stack.url, HELD)
        assert degraded.status_code == 200, degraded.text
        body = degraded.json()
        assert body["model"] == HELD and body["degraded"] is True
        assert body["answered_by"] == {"model": MODEL, "version": "1"} and body["version"] == "1"
        assert len(body["results"]) == 1 and body["results"][0]["predictions"]
        # A pinned version is never degraded: it joins the held request's batch, and both are answered.
        pinned = classify(stack.url, HELD, "?version=1")
    assert pinned.status_code == 200 and "degraded" not in pinned.json(), pinned.text
    assert first[0].status_code == 200 and "degraded" not in first[0].json(), first[0].text
    assert metric(stack.url, "gateway_degraded_requests_total", model=HELD, to=MODEL) == 1
    assert f'"degraded_to": "{MODEL}"' in stack.log_path.read_text()


def test_without_the_setting_the_next_request_waits_for_its_own_model(stack):
    with one_held(stack.url, HELD_PLAIN) as first:
        second = classify(stack.url, HELD_PLAIN)  # completes the held request's batch
    assert second.status_code == 200 and "degraded" not in second.json(), second.text
    assert first[0].status_code == 200 and "degraded" not in first[0].json(), first[0].text
    assert metric(stack.url, "gateway_degraded_requests_total", model=HELD_PLAIN, to=MODEL) is None
