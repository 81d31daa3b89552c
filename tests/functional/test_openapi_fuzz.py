"""Schemathesis against the gateway's own /openapi.json, with the real gateway and Triton behind it: requests
made from the schema, valid ones and ones that break it, none answered with a 5xx or without the gateway's
JSON error body. (Cases are drawn with schemathesis' strategies under Hypothesis here; its pytest plugin's
parametrize does not run under this pytest.)"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from server.app import create_app
from server.settings import Settings

from .conftest import MODEL, PIXEL_MODEL

# Every operation the gateway documents, read from the app itself: a new route is fuzzed without a change here.
# Those that take input (parameters or a body) also get requests that break the schema.
PATHS = create_app(Settings(log_json=False)).openapi()["paths"]
OPERATIONS = [f"{method.upper()} {path}" for path, methods in PATHS.items() for method in methods]
CASES = [
    pytest.param(f"{method.upper()} {path}", mode, id=f"{method.upper()} {path} {mode.value}")
    for path, methods in PATHS.items()
    for method, spec in methods.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or spec.get("parameters") or spec.get("requestBody")
]
# Few per operation and mode: `make test` runs this.
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def live_schema(gateway):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as http:
        yield http


def served_path_parameters(operation) -> dict[str, st.SearchStrategy] | None:
    """Path parameters that mostly name the served models and version 1, so that requests get past the 404 to
    Triton; now and then whatever the schema allows."""
    names = {p.name for p in operation.path_parameters}
    if not names:
        return None
    return {
        name: {"name": st.sampled_from([MODEL, PIXEL_MODEL]), "version": st.just("1")}[name]
        for name in names & {"name", "version"}
    }


def test_the_live_schema_documents_the_same_operations_as_the_app(live_schema):
    assert sorted(op.ok().label for op in live_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label, mode", CASES)
def test_requests_made_from_the_openapi_schema_never_get_a_5xx(live_schema, gateway, session, label, mode):
    operation = live_schema.find_operation_by_label(label)
    fixed = served_path_parameters(operation)
    strategy = operation.as_strategy(mode)
    if fixed:
        strategy = st.one_of(
            strategy,
            st.fixed_dictionaries(fixed).flatmap(lambda values: operation.as_strategy(mode, path_parameters=values)),
        )

    @FUZZ
    @given(case=strategy)
    def check(case) -> None:
        response = case.call(base_url=gateway.url, session=session, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text[:500], case.as_curl_command())
        if response.status_code >= 400:
            error = response.json()["error"]
            message = error if case.path.startswith("/v2/") else error["message"]
            assert isinstance(message, str) and message, response.text

    check()
