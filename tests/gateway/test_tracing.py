"""Tracing's cost when off, which needs no Triton: no tracer provider and no exporter thread unless
GATEWAY_TRACING is on. What tracing records, against a real Triton, is in tests/functional/test_tracing.py."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from server.app import create_app

from .conftest import gateway_settings


def exporter_threads() -> list[str]:
    return sorted(thread.name for thread in threading.enumerate() if "otel" in thread.name.lower())


def test_tracing_off_makes_no_provider_and_no_exporter_thread(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing is sent: no request
    made = {}
    for tracing_on in (False, True):  # the same gateway but for the setting
        before = exporter_threads()
        app = create_app(gateway_settings(tracing=tracing_on))
        with TestClient(app):
            made[tracing_on] = (app.state.tracer_provider is not None, len(exporter_threads()) - len(before))
        assert exporter_threads() == before  # the provider's shutdown ends its thread
    assert made == {False: (False, 0), True: (True, 1)}
