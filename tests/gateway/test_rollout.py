"""Version choice in process: a model's rollout splits classifications between two versions, a pinned version
wins, the answer, the log line and the metrics say which version answered, and a version Triton unloaded
under a promote or abort is routed again instead of failing."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from server.errors import TritonFailed, TritonUnavailable
from server.rollout import Guard, Rollout
from server.triton import Inference, ModelInfo

from .conftest import INFO, MODEL, ServedReplicas, client_of, gateway_settings, png

CLASSIFY = f"/v1/models/{MODEL}/classify"
PNG = {"Content-Type": "image/png"}


class RolloutReplicas(ServedReplicas):
    """The model with a rollout in its config; versions in `unloaded` answer as Triton does for a version it
    has unloaded. After `promote()`, the config read afresh has no rollout any more."""

    def __init__(self, rollout: Rollout) -> None:
        super().__init__()
        self.info = dataclasses.replace(INFO, rollout=rollout)
        self.fresh_info = self.info
        self.unloaded: set[str] = set()
        self.asked: list[str] = []
        self.served_alone = "2"  # Triton's choice without a version: its newest loaded

    async def model_info(self, name: str) -> ModelInfo:
        return self.info

    def forget_model_info(self, name: str) -> None:
        self.info = self.fresh_info

    def promote(self, version: int) -> None:
        """The repository serves `version` alone; Triton has unloaded the other, the gateway's cache is stale."""
        self.fresh_info = dataclasses.replace(INFO, rollout=None, specific_versions=(version,))
        self.unloaded = {str(v) for v in self.info.rollout.versions if v != version}
        self.served_alone = str(version)

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        self.asked.append(version)
        if version in self.unloaded:
            raise TritonUnavailable(f"model {MODEL!r} is not ready (state UNAVAILABLE)", retry_after_s=1)
        answered = version or self.served_alone
        logits = np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))
        return Inference(logits, answered, "bytes")


def _classify(client, **kwargs) -> str:
    answer = client.post(CLASSIFY, content=png(), **{"headers": PNG, **kwargs})
    assert answer.status_code == 200, answer.text
    return answer.json()["version"]


def test_a_rollout_splits_requests_and_the_answer_log_and_metrics_name_the_version(caplog):
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=50))
    with caplog.at_level(logging.INFO, logger="server"), client_of(gateway_settings(), replicas) as client:
        versions = [_classify(client) for _ in range(60)]
        registry = client.app.state.metrics.registry
        counted = {
            v: registry.get_sample_value(
                "gateway_version_requests_total", {"model": MODEL, "version": v, "status": "200"}
            )
            for v in ("1", "2")
        }
        latency = registry.get_sample_value("gateway_version_request_seconds_count", {"model": MODEL, "version": "2"})
    # Triton was asked for each version by name, and both answered.
    assert set(replicas.asked) == {"1", "2"} and replicas.asked == versions
    assert counted == {"1": versions.count("1"), "2": versions.count("2")}
    assert latency == versions.count("2")
    logged = [r.fields["version"] for r in caplog.records if getattr(r, "fields", {}).get("path") == CLASSIFY]
    assert logged == versions


def test_a_pinned_version_wins_over_the_rollout():
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=100))
    with client_of(gateway_settings(), replicas) as client:
        assert {_classify(client, params={"version": "1"}) for _ in range(10)} == {"1"}
        assert {_classify(client) for _ in range(10)} == {"2"}


def test_a_sticky_rollout_answers_one_client_with_one_version():
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=50, sticky_header="x-client-id"))
    with client_of(gateway_settings(), replicas) as client:
        per_client = {
            c: {_classify(client, headers={**PNG, "X-Client-ID": f"client-{c}"}) for _ in range(5)} for c in range(20)
        }
    assert all(len(seen) == 1 for seen in per_client.values())
    assert set().union(*per_client.values()) == {"1", "2"}  # and the clients are split


def test_a_version_unloaded_by_a_promote_is_routed_again_from_the_fresh_config():
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=0))
    with client_of(gateway_settings(), replicas) as client:
        assert _classify(client) == "1"
        replicas.promote(2)  # Triton serves version 2 alone; the gateway still holds the rollout
        assert _classify(client) == "2"
    # Asked for the stable version, then (the config read again, no rollout in it) for the one it names.
    assert replicas.asked == ["1", "1", "2"]


def test_a_pinned_version_that_is_gone_is_not_routed_elsewhere():
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=0))
    replicas.unloaded = {"2"}
    with client_of(gateway_settings(), replicas) as client:
        answer = client.post(CLASSIFY, content=png(), headers=PNG, params={"version": "2"})
        registry = client.app.state.metrics.registry
        # The failed request is counted without a version: a client's string is never a label.
        none = registry.get_sample_value(
            "gateway_version_requests_total", {"model": MODEL, "version": "none", "status": "503"}
        )
    assert answer.status_code == 503 and answer.json()["error"]["code"]
    assert replicas.asked == ["2"] and none == 1


def test_without_a_rollout_the_version_the_config_names_is_asked_for_by_name():
    """After an abort Triton serves on with the old config (the canary the newest) until the new one has
    loaded: the gateway asks for the version the new config names rather than for Triton's newest."""
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=50))
    replicas.info = dataclasses.replace(INFO, specific_versions=(1,))
    with client_of(gateway_settings(), replicas) as client:
        assert {_classify(client) for _ in range(10)} == {"1"}
    replicas = RolloutReplicas(Rollout(stable=1, canary=2, canary_percent=50))
    replicas.info = INFO  # a `latest` policy: Triton chooses
    with client_of(gateway_settings(), replicas) as client:
        assert _classify(client) == "2" and replicas.asked == [""]


class FailingCanaryReplicas(RolloutReplicas):
    """Triton fails every request for version 2 (its model breaks at run time)."""

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        if version == "2":
            self.asked.append(version)
            raise TritonFailed("Triton error: failed to run the model")
        return await super().infer(info, batch, version, slot)


def test_what_a_failing_canary_gets_the_stable_version_answers_until_the_canary_is_halted() -> None:
    replicas = FailingCanaryReplicas(Rollout(1, 2, 50, guard=Guard(min_requests=5), id="r1"))
    with client_of(gateway_settings(), replicas) as client:
        versions = [_classify(client) for _ in range(40)]  # each answered 200
        registry = client.app.state.metrics.registry
        retried = registry.get_sample_value("gateway_rollout_canary_retries_total", {"model": MODEL, "version": "2"})
        halted = registry.get_sample_value(
            "gateway_rollout_canary_halted", {"model": MODEL, "version": "2", "rollout": "r1", "reason": "error_rate"}
        )
    assert set(versions) == {"1"}
    # Five failures (min_requests) halt it: no request is sent to it after them.
    assert replicas.asked.count("2") == 5 and retried == 5 and halted == 1


class TritonDownReplicas(RolloutReplicas):
    """Triton is unreachable: every version fails alike."""

    async def infer(self, info: ModelInfo, batch: np.ndarray, version: str = "", slot=None) -> Inference:
        self.asked.append(version)
        raise TritonUnavailable("Triton is unreachable", retry_after_s=1)


def test_a_triton_outage_is_not_counted_against_the_canary() -> None:
    replicas = TritonDownReplicas(Rollout(1, 2, 100, guard=Guard(min_requests=5), id="r1"))
    with client_of(gateway_settings(), replicas) as client:
        statuses = {client.post(CLASSIFY, content=png(), headers=PNG).status_code for _ in range(10)}
        watch = client.app.state.canary_watch
        assert watch.halted(MODEL) is None and not any(watch.watched[MODEL].windows.canary_errors)
    assert statuses == {503} and replicas.asked.count("2") == 10
