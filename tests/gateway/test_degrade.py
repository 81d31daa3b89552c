"""Degradation in process, with the in-flight counts set by the test: past the slow model's threshold the
request goes to the faster model (said in the answer, the log line and the metrics), past the faster
model's limit too it is refused with 429, and a faster model that cannot take the batch is not used."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from server.degrade import Degrade
from server.errors import ModelNotFound
from server.triton import Inference, ModelInfo

from .conftest import INFO, client_of, gateway_settings, png, rejections

SLOW, FAST = "digits-fp32", "digits-int8"
CLASSIFY = f"/v1/models/{SLOW}/classify"
PNG = {"Content-Type": "image/png"}


class TwoModels:
    """SLOW, degrading to FAST past one request in flight (FAST: two); records which model Triton ran."""

    def __init__(self, fast: ModelInfo | None = None) -> None:
        self.infos = {
            SLOW: dataclasses.replace(INFO, name=SLOW, degrade=Degrade(FAST, in_flight=1, to_in_flight=2)),
            FAST: fast or dataclasses.replace(INFO, name=FAST),
        }
        self.ran: list[str] = []

    async def model_info(self, name: str) -> ModelInfo:
        if name not in self.infos:
            raise ModelNotFound(f"model {name!r} is not served")
        return self.infos[name]

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        self.ran.append(info.name)
        return Inference(np.tile(np.arange(10, dtype=np.float32), (len(batch), 1)), version or "7", "bytes")


def _counts(client) -> dict:
    return client.app.state.inference_slots.models.counts


def test_past_the_threshold_the_faster_model_answers_and_everything_says_so(caplog):
    replicas = TwoModels()
    with caplog.at_level(logging.INFO, logger="server"), client_of(gateway_settings(), replicas) as client:
        alone = client.post(CLASSIFY, content=png(), headers=PNG)
        _counts(client)[SLOW] = 1  # one request of the slow model in flight
        degraded = client.post(CLASSIFY, content=png(), headers=PNG)
        pinned = client.post(f"{CLASSIFY}?version=3", content=png(), headers=PNG)
        registry = client.app.state.metrics.registry
        counted = registry.get_sample_value("gateway_degraded_requests_total", {"model": SLOW, "to": FAST})
        by_version = registry.get_sample_value(
            "gateway_version_requests_total", {"model": SLOW, "version": "degraded", "status": "200"}
        )
        left = dict(_counts(client))
    assert alone.status_code == 200 and "degraded" not in alone.json()
    assert degraded.status_code == 200, degraded.text
    assert degraded.json()["degraded"] is True and degraded.json()["model"] == SLOW
    assert degraded.json()["answered_by"] == {"model": FAST, "version": "7"}
    assert pinned.status_code == 200 and "degraded" not in pinned.json()
    assert replicas.ran == [SLOW, FAST, SLOW]
    assert counted == 1 and by_version == 1
    assert left == {SLOW: 1}  # the requests' own counts are gone with them
    logged = [getattr(r, "fields", {}).get("degraded_to") for r in caplog.records]
    assert logged.count(FAST) == 1


def test_with_the_faster_model_at_its_limit_too_the_request_is_refused_with_429():
    replicas = TwoModels()
    with client_of(gateway_settings(), replicas) as client:
        _counts(client).update({SLOW: 1, FAST: 2})
        refused = client.post(CLASSIFY, content=png(), headers=PNG)
        assert rejections(client, "too_many_requests") == 1
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "too_many_requests"
    assert replicas.ran == []


def test_a_faster_model_with_other_labels_is_not_used():
    other = dataclasses.replace(INFO, name=FAST, labels=tuple("abcdefghij"))
    replicas = TwoModels(fast=other)
    with client_of(gateway_settings(), replicas) as client:
        _counts(client)[SLOW] = 1
        answer = client.post(CLASSIFY, content=png(), headers=PNG)
    assert answer.status_code == 200 and "degraded" not in answer.json()
    assert replicas.ran == [SLOW]


class MissingTarget(TwoModels):
    """FAST is not in the repository; counts how often its config is asked for."""

    def __init__(self) -> None:
        super().__init__()
        del self.infos[FAST]
        self.asked: list[str] = []

    async def model_info(self, name: str) -> ModelInfo:
        self.asked.append(name)
        return await super().model_info(name)


def test_a_missing_faster_model_is_logged_once_and_not_asked_for_on_every_request(caplog):
    replicas = MissingTarget()
    with caplog.at_level(logging.WARNING, logger="server"), client_of(gateway_settings(), replicas) as client:
        for _ in range(5):
            _counts(client)[SLOW] = 1
            assert client.post(CLASSIFY, content=png(), headers=PNG).status_code == 200
    assert replicas.ran == [SLOW] * 5
    assert replicas.asked.count(FAST) == 1  # within the config lifetime, the failed lookup is kept
    assert [r.getMessage() for r in caplog.records if "cannot degrade" in r.getMessage()] == [
        f"model {SLOW!r}: cannot degrade to {FAST!r}: model {FAST!r} is not served"
    ]
