"""Canary rollouts against the real stack: the gateway follows the split written into config.pbtxt, and a
promote or an abort under steady load fails no request.

One Triton (polling its repository every second) and one gateway (config cache 0.5 s) for the module, on a
repository of its own: version 1, then version 2 published with `--canary`.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import tritonclient.http as httpclient
from PIL import Image

from builder import rollout
from builder.publish import PublishSettings, publish
from tests.onnx_variants import retrained

from .conftest import start_gateway, start_triton

MODEL = "digits"
# Waiting for Triton to reload and the gateway to read the config again; a bound, not a measured time.
FOLLOW_TIMEOUT_S = 60
LOAD_CLIENTS = 2
LOAD_MAX_REQUESTS = 4000


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8), 90).save(out, format="PNG")
    return out.getvalue()


IMAGE = _png()


@pytest.fixture(scope="module")
def canary_repository(tiny_run, tmp_path_factory):  # noqa: F811  (tiny_run: from the conftest)
    repository = tmp_path_factory.mktemp("rollout_repository")
    # One instance per version: each rollout step reloads the model.
    settings = PublishSettings(instance_count=1)
    publish(tiny_run / "model.onnx", repository, MODEL, settings=settings)
    second = retrained(tiny_run / "model.onnx", tmp_path_factory.mktemp("retrained") / "model.onnx")
    publish(second, repository, MODEL, settings=PublishSettings(instance_count=1, canary_percent=50))
    return repository


@pytest.fixture(scope="module")
def stack(canary_repository, tmp_path_factory):
    triton = start_triton(canary_repository, tmp_path_factory.mktemp("rollout-triton"))
    try:
        gateway = start_gateway(
            triton.grpc_url, tmp_path_factory.mktemp("rollout-gateway") / "gateway.log", triton.http_url
        )
        try:
            yield canary_repository, triton, gateway
        finally:
            gateway.stop()
    finally:
        triton.stop()


def classify(client: httpx.Client, url: str) -> httpx.Response:
    return client.post(
        f"{url}/v1/models/{MODEL}/classify", content=IMAGE, headers={"Content-Type": "image/png"}, timeout=30
    )


def versions_answering(url: str, requests: int) -> Counter:
    with httpx.Client() as client:
        answers = [classify(client, url) for _ in range(requests)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return Counter(a.json()["version"] for a in answers)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {FOLLOW_TIMEOUT_S} s: {what}"
        time.sleep(0.2)


def gateway_follows(gateway, triton, rollout_state: dict | None, ready: set[str]) -> None:
    """Wait until Triton has loaded exactly `ready` and the gateway reads `rollout_state` from its config."""
    client = httpclient.InferenceServerClient(triton.http_url)

    def loaded() -> bool:
        index = client.get_model_repository_index()
        return {e["version"] for e in index if e["name"] == MODEL and e.get("state") == "READY"} == ready

    wait_for(loaded, f"Triton serves versions {sorted(ready)}")
    wait_for(
        lambda: httpx.get(f"{gateway.url}/v1/models/{MODEL}", timeout=10).json().get("rollout") == rollout_state,
        f"the gateway reads rollout {rollout_state}",
    )


@contextmanager
def steady_load(url: str) -> Iterator[list[tuple[float, httpx.Response]]]:
    """Classifications from LOAD_CLIENTS threads, back to back, until the block ends (at most
    LOAD_MAX_REQUESTS): (when each was sent, its answer)."""
    answers: list[tuple[float, httpx.Response]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client() as client:
            while not stop.is_set() and len(answers) < LOAD_MAX_REQUESTS:
                sent = time.monotonic()
                answers.append((sent, classify(client, url)))

    threads = [threading.Thread(target=client_loop) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield answers
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _summary(sent_answers: list[tuple[float, httpx.Response]]) -> dict:
    answers = [a for _, a in sent_answers]
    failed = [a for a in answers if a.status_code != 200]
    return {
        "requests": len(answers),
        "failed": len(failed),
        "statuses": sorted(Counter(a.status_code for a in failed).items()),
        "versions": sorted(Counter(a.json()["version"] for a in answers if a.status_code == 200).items()),
    }


def test_the_gateway_follows_the_split_in_config_pbtxt(stack):
    repository, triton, gateway = stack
    # publish --canary: version 1 stays stable, version 2 gets half.
    gateway_follows(
        gateway, triton, {"stable": 1, "canary": 2, "canary_percent": 50.0, "sticky_header": ""}, {"1", "2"}
    )
    half = versions_answering(gateway.url, 200)
    print(f"\n50% canary, 200 requests: {dict(half)}")
    assert set(half) == {"1", "2"}
    assert 60 <= half["2"] <= 140  # 50% +- 5 standard deviations of 200 draws

    rollout.start(repository, MODEL, 10)
    gateway_follows(
        gateway, triton, {"stable": 1, "canary": 2, "canary_percent": 10.0, "sticky_header": ""}, {"1", "2"}
    )
    tenth = versions_answering(gateway.url, 200)
    print(f"10% canary, 200 requests: {dict(tenth)}")
    assert set(tenth) <= {"1", "2"} and 4 <= tenth["2"] <= 41  # 20 expected; +- 5 standard deviations

    # Sticky by a client id: each client sees one version.
    rollout.start(repository, MODEL, 50, sticky_header="X-Client-ID")
    sticky = {"stable": 1, "canary": 2, "canary_percent": 50.0, "sticky_header": "x-client-id"}
    gateway_follows(gateway, triton, sticky, {"1", "2"})
    with httpx.Client() as client:
        seen = {
            c: {
                client.post(
                    f"{gateway.url}/v1/models/{MODEL}/classify",
                    content=IMAGE,
                    headers={"Content-Type": "image/png", "X-Client-ID": f"client-{c}"},
                    timeout=30,
                ).json()["version"]
                for _ in range(3)
            }
            for c in range(20)
        }
    assert all(len(versions) == 1 for versions in seen.values()) and set().union(*seen.values()) == {"1", "2"}


def test_promote_and_abort_under_steady_load_fail_no_request(stack, tiny_run, tmp_path):
    repository, triton, gateway = stack
    rollout.start(repository, MODEL, 50, sticky_header="")
    gateway_follows(
        gateway, triton, {"stable": 1, "canary": 2, "canary_percent": 50.0, "sticky_header": ""}, {"1", "2"}
    )

    with steady_load(gateway.url) as answers:
        started = time.monotonic()
        assert rollout.promote(repository, MODEL) == 2
        gateway_follows(gateway, triton, None, {"2"})
        followed, followed_at = len(answers), time.monotonic()
        wait_for(lambda: len(answers) >= followed + 100, "100 more requests")
    promoted = _summary(answers)
    print(f"\npromote under load: {promoted}, followed after {followed} requests, {followed_at - started:.1f} s")
    assert promoted["failed"] == 0, promoted
    # Every request sent once the gateway had read the new config went to the promoted version.
    assert {a.json()["version"] for sent, a in answers if sent > followed_at} == {"2"}

    # Version 3 published as a canary beside version 2, then aborted.
    third = retrained(tiny_run / "model.onnx", tmp_path / "third.onnx")
    publish(third, repository, MODEL, settings=PublishSettings(instance_count=1, canary_percent=50))
    gateway_follows(
        gateway, triton, {"stable": 2, "canary": 3, "canary_percent": 50.0, "sticky_header": ""}, {"2", "3"}
    )
    with steady_load(gateway.url) as answers:
        started = time.monotonic()
        assert rollout.abort(repository, MODEL) == 2
        gateway_follows(gateway, triton, None, {"2"})
        followed, followed_at = len(answers), time.monotonic()
        wait_for(lambda: len(answers) >= followed + 100, "100 more requests")
    aborted = _summary(answers)
    print(f"abort under load: {aborted}, followed after {followed} requests, {followed_at - started:.1f} s")
    assert aborted["failed"] == 0, aborted
    assert {a.json()["version"] for sent, a in answers if sent > followed_at} == {"2"}

    # --status reads this gateway's per-version figures.
    report = rollout.status(repository, MODEL, gateway.url)
    print(f"status: {report}")
    assert report["rollout"] is None and report["served"] == [2]
    assert report["versions"]["2"]["requests"] > 0 and report["versions"]["3"]["requests"] > 0
    assert all(v["errors"] == 0 for v in report["versions"].values())
