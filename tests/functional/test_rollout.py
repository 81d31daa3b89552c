"""Canary rollouts against the real stack: the gateway follows the split written into config.pbtxt, a
promote or an abort under steady load fails no request, and a canary that disagrees with the stable version,
or is much slower, is halted without failing one.

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
from builder.cli import main
from builder.publish import PublishSettings, publish
from loadtests.canary import with_classes_rolled, with_extra_work
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
    # Two versions of one model on this shared machine differ in latency by noise alone: the splits measured
    # here must not be cut short by the p99 rail (test_a_bad_canary_is_halted judges agreement).
    rollout.start(repository, MODEL, 50, guard={"max_p99_ratio": 0})
    return repository


@pytest.fixture(scope="module")
def stack(canary_repository, tmp_path_factory):
    triton = start_triton(canary_repository, tmp_path_factory.mktemp("rollout-triton"))
    try:
        # One worker: the canary's halt is judged per gateway process, on that process's own requests.
        gateway = start_gateway(
            triton.grpc_url,
            tmp_path_factory.mktemp("rollout-gateway") / "gateway.log",
            triton.http_url,
            GATEWAY_WORKERS="1",
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

    def read() -> bool:
        served = httpx.get(f"{gateway.url}/v1/models/{MODEL}", timeout=10).json().get("rollout")
        if rollout_state is None or served is None:
            return served == rollout_state
        return {key: served.get(key) for key in rollout_state} == rollout_state

    wait_for(read, f"the gateway reads rollout {rollout_state}")


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


def canary_halted(gateway, canary: int, rollout_id: str) -> str | None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return rollout.traffic(text, MODEL, rollout_id).get(str(canary), {}).get("halted")


def test_a_slow_canary_is_halted_by_its_p99_with_no_request_failed(stack, tiny_run, tmp_path):
    repository, triton, gateway = stack
    if rollout.state(repository, MODEL)["rollout"] is not None:
        rollout.abort(repository, MODEL)
    # The same answers after some 50 million more multiply-adds per image: many times the stable version's
    # inference time, whatever the machine's load (the rail compares the two over the same moments).
    slow = with_extra_work(tiny_run / "model.onnx", tmp_path / "slow.onnx")
    canary = publish(slow, repository, MODEL, settings=PublishSettings(instance_count=1, canary_percent=50)).version
    # The p99 rail alone (2x, its default) over 20 requests; no shadow calls to load the stable version.
    started = rollout.start(repository, MODEL, 50, shadow_percent=0, guard={"min_requests": 20, "min_agreement": 0})
    stable = str(started.stable)
    expected = {"stable": started.stable, "canary": canary, "canary_percent": 50.0, "id": started.id}
    gateway_follows(gateway, triton, expected, {stable, str(canary)})

    answers: list[httpx.Response] = []
    with httpx.Client() as client:
        while not canary_halted(gateway, canary, started.id) and len(answers) < 400:
            answers += [classify(client, gateway.url) for _ in range(5)]
        before = Counter(a.json()["version"] for a in answers if a.status_code == 200)
        after = [classify(client, gateway.url) for _ in range(20)]
    failed = [a.text for a in answers + after if a.status_code != 200]
    print(f"\nslow canary halted after {len(answers)} requests, {before[str(canary)]} answered by it")
    assert canary_halted(gateway, canary, started.id) == "p99" and failed == []
    assert {a.json()["version"] for a in after} == {stable}
    rollout.abort(repository, MODEL)


def test_a_bad_canary_is_halted_with_no_request_failed_and_status_shows_why(stack, tiny_run, tmp_path):
    repository, triton, gateway = stack
    if rollout.state(repository, MODEL)["rollout"] is not None:  # run on its own: the module's first rollout
        rollout.abort(repository, MODEL)
    # Its classes rolled by one: it never gives the stable version's top-1 answer.
    wrong = with_classes_rolled(tiny_run / "model.onnx", tmp_path / "wrong.onnx")
    canary = publish(wrong, repository, MODEL, settings=PublishSettings(instance_count=1, canary_percent=50)).version
    started = rollout.start(repository, MODEL, 50, shadow_percent=100, guard={"min_requests": 20, "max_p99_ratio": 0})
    stable = str(started.stable)
    expected = {"stable": started.stable, "canary": canary, "canary_percent": 50.0, "id": started.id}
    gateway_follows(gateway, triton, expected, {stable, str(canary)})

    def halted() -> str | None:
        return canary_halted(gateway, canary, started.id)

    answers: list[httpx.Response] = []
    with httpx.Client() as client:
        # 20 comparisons, one per canary answer, decide; shadow calls finish in the background.
        while not halted() and len(answers) < 300:
            answers += [classify(client, gateway.url) for _ in range(5)]
        before = Counter(a.json()["version"] for a in answers if a.status_code == 200)
        after = [classify(client, gateway.url) for _ in range(40)]
    failed = [a.text for a in answers + after if a.status_code != 200]
    print(f"\nhalted after {len(answers)} requests, {before[str(canary)]} answered by the canary")
    assert halted() == "agreement" and failed == []
    assert {a.json()["version"] for a in after} == {stable}

    report = rollout.status(repository, MODEL, gateway.url)
    print(f"status: {report['versions'][str(canary)]}")
    assert report["versions"][str(canary)]["halted"] == "agreement"
    agreement = report["versions"][str(canary)]["agreement"]["stable"]
    assert agreement["images"] >= 20 and agreement["top1"] < 0.9
    assert gateway.log_path.read_text().count(f"canary version {canary} halted") == 1

    # `rollout --promote` asks this gateway first, and refuses: nothing is written.
    config_before = (repository / MODEL / "config.pbtxt").read_bytes()
    promote = ["rollout", MODEL, "--promote", "--repository", str(repository), "--gateway-url", gateway.url]
    assert main(promote) == 2
    assert (repository / MODEL / "config.pbtxt").read_bytes() == config_before

    # Another `rollout --canary` is another rollout: this gateway serves its canary again. The old halt is
    # not reported for it, even before a request has shown the gateway the new rollout.
    again = rollout.start(repository, MODEL, 50)
    assert "halted" not in rollout.status(repository, MODEL, gateway.url)["versions"].get(str(canary), {})
    # Nor can it be promoted at once: its rails have judged none of its requests yet.
    assert main(promote) == 2
    gateway_follows(gateway, triton, {**expected, "id": again.id}, {stable, str(canary)})
    assert str(canary) in versions_answering(gateway.url, 20)
    rollout.abort(repository, MODEL)
