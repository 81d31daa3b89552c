"""Routes in process: what each kind of bad request is answered with, and the classify defaults."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from .conftest import CLASSES, MODEL, ServedReplicas, client_of, gateway_settings, png, rejections

CLASSIFY = f"/v1/models/{MODEL}/classify"


def error_of(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_classify_answers_the_top_classes_in_order(gateway):
    answer = gateway.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"}, params={"top_k": 3})
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    assert [p["index"] for p in result["predictions"]] == [9, 8, 7]


def test_without_top_k_classify_answers_the_configured_default():
    with client_of(gateway_settings(default_top_k=3)) as client:
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200
        assert len(answer.json()["results"][0]["predictions"]) == 3
        given = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"}, params={"top_k": 7})
        assert len(given.json()["results"][0]["predictions"]) == 7


def test_the_default_top_k_is_capped_by_the_classes_a_model_has():
    with client_of(gateway_settings(default_top_k=50)) as client:
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and len(answer.json()["results"][0]["predictions"]) == CLASSES


@pytest.mark.parametrize(
    "path, kwargs, status, code",
    [
        (
            "/v1/models/nope/classify",
            {"content": png(), "headers": {"Content-Type": "image/png"}},
            404,
            "model_not_found",
        ),
        (CLASSIFY, {"content": b"junk", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
        (CLASSIFY, {"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
        (CLASSIFY, {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        (CLASSIFY + "?top_k=0", {"content": png(), "headers": {"Content-Type": "image/png"}}, 422, "invalid_request"),
        (CLASSIFY + "?version=x", {"content": png(), "headers": {"Content-Type": "image/png"}}, 422, "invalid_request"),
        (
            "/v1/models/bad name!/classify",
            {"content": png(), "headers": {"Content-Type": "image/png"}},
            422,
            "invalid_request",
        ),
        ("/v1/nowhere", {"content": b""}, 404, "not_found"),
    ],
    ids=["unknown model", "not an image", "empty body", "text", "top_k 0", "bad version", "bad name", "no route"],
)
def test_bad_requests_get_a_4xx_with_the_error_body_and_are_counted(gateway, path, kwargs, status, code):
    before = rejections(gateway, code)
    assert error_of(gateway.post(path, **kwargs)) == (status, code)
    assert rejections(gateway, code) == before + 1


def test_unknown_model_details_are_404(gateway):
    assert error_of(gateway.get("/v1/models/nope")) == (404, "model_not_found")
    assert gateway.get(f"/v1/models/{MODEL}").json()["labels"] == [str(i) for i in range(CLASSES)]


class BrokenReplicas:
    """A replica pool with a bug in it: every call fails with an error the gateway does not expect."""

    async def server_ready(self) -> bool:
        return True

    async def model_info(self, name: str):
        raise RuntimeError("a bug")

    repository_index = statistics = model_info


def test_an_unexpected_error_is_a_json_500_and_counted():
    with client_of(gateway_settings(), BrokenReplicas(), raise_server_exceptions=False) as client:
        answer = client.post(CLASSIFY, content=png(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 500
        assert answer.json() == {"error": {"code": "internal_error", "message": "internal error; see the gateway log"}}
        assert rejections(client, "internal_error") == 1
        requests = client.app.state.metrics.registry.get_sample_value(
            "gateway_requests_total", {"model": "unknown", "status": "500"}
        )
        assert requests == 1


def test_kserve_requests_the_gateway_refuses_are_counted_and_answered_as_kserve_errors(gateway):
    before = rejections(gateway, "bad_request")
    answer = gateway.post(
        f"/v2/models/{MODEL}/infer", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]
    assert rejections(gateway, "bad_request") == before + 1


def test_kserve_requests_when_triton_is_unreachable_are_503_and_counted(gateway):
    before = rejections(gateway, "triton_unavailable")
    answer = gateway.get(f"/v2/models/{MODEL}")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert rejections(gateway, "triton_unavailable") == before + 1


def test_the_repository_api_is_not_routed(gateway):
    assert gateway.post("/v2/repository/index", json={}).status_code == 404


class IndexedReplicas(ServedReplicas):
    """Serves the model, with the repository index the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.index: list[dict[str, str]] = []

    async def repository_index(self) -> list[dict[str, str]]:
        return self.index


def test_versions_that_failed_to_load_are_counted_per_model_from_each_read_of_the_index():
    replicas = IndexedReplicas()
    failed = {"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": "failed to load 'digits' version 2"}
    replicas.index = [
        {"name": MODEL, "version": "1", "state": "READY", "reason": ""},
        failed,
        {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]

    def unavailable(client: TestClient, model: str) -> float | None:
        registry = client.app.state.metrics.registry
        return registry.get_sample_value("gateway_model_versions_unavailable", {"model": model})

    with client_of(gateway_settings(), replicas) as client:
        listed = client.get("/v1/models").json()["models"]
        # The previous version serves on; the failed one is listed with Triton's reason.
        assert listed[0]["ready"] and listed[0]["versions"][1] == {
            "version": "2",
            "state": "UNAVAILABLE",
            "reason": failed["reason"],
        }
        assert unavailable(client, MODEL) == 1 and unavailable(client, "other") == 0  # unloaded is no failure
        replicas.index = [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
        assert client.get("/readyz").status_code == 200
        assert unavailable(client, MODEL) == 0 and unavailable(client, "other") is None


def test_readiness_waits_for_no_model_that_cannot_load_and_names_those_it_waits_for():
    replicas = IndexedReplicas()
    ready = {"name": MODEL, "version": "1", "state": "READY", "reason": ""}
    no_backend = {"name": "m-preprocess", "version": "1", "state": "UNAVAILABLE", "reason": "unable to find 'dali'"}
    # An ensemble whose step failed to load: Triton lists its name alone, with no version or state.
    ensemble = {"name": "m-ensemble", "version": "", "state": "", "reason": ""}
    replicas.index = [ready, no_backend, ensemble]
    with client_of(gateway_settings(), replicas) as client:
        assert client.get("/readyz").status_code == 200
        replicas.index = [ready, no_backend, ensemble, {"name": "m", "version": "1", "state": "LOADING", "reason": ""}]
        waiting = client.get("/readyz")
        assert waiting.status_code == 503 and waiting.json()["reason"] == "1 of 2 models not ready: m"
