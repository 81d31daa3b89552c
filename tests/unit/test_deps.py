"""The gateway's FastAPI dependencies are coroutines: FastAPI runs a plain `def` dependency in its thread
pool, a thread hop per dependency per request that cost about 1 ms of gateway CPU per image in `make bench`."""

import inspect
import typing

import pytest

from server import deps, security


def providers():
    for name, value in vars(deps).items():
        if name.endswith("Dep"):
            (dependency,) = [m for m in typing.get_args(value)[1:] if hasattr(m, "dependency")]
            yield name, dependency.dependency
    yield "require_api_key", security.require_api_key
    yield "require_key_for_metrics", security.require_key_for_metrics
    yield "require_key_for_docs", security.require_key_for_docs


@pytest.mark.parametrize("name, provider", list(providers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_dependency_runs_on_the_event_loop(name, provider):
    assert inspect.iscoroutinefunction(provider), f"{name} is a plain function: FastAPI would run it in a thread"


def test_every_annotated_dependency_is_checked():
    assert len([name for name, _ in providers() if name.endswith("Dep")]) >= 9
