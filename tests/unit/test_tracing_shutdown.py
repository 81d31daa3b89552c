"""The gateway's tracing at shutdown: a collector that hangs cannot hold the process past its deadline."""

import logging
import socket

from server.app import create_app
from server.settings import Settings
from server.tracing import shut_down, tracer_provider


def test_spans_for_a_collector_that_never_answers_are_dropped_after_the_flush_timeout(monkeypatch, caplog):
    with socket.socket() as collector:  # accepts connections (the kernel's backlog) and never answers
        collector.bind(("127.0.0.1", 0))
        collector.listen(8)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.getsockname()[1]}")
        provider = tracer_provider(Settings(tracing=True))
        assert provider is not None
        with provider.get_tracer("test").start_as_current_span("request"):
            pass
        with caplog.at_level(logging.WARNING, logger="server.tracing"):
            shut_down(provider, timeout_s=0.5)
    assert "dropped" in caplog.text


def test_the_sdks_own_log_lines_are_json_like_the_gateways(monkeypatch):
    from server.app import JsonFormatter, log

    otel = logging.getLogger("opentelemetry")
    for logger in (log, otel):
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "propagate", True)
    create_app(Settings(log_json=True))
    assert [type(h.formatter) for h in otel.handlers] == [JsonFormatter] and not otel.propagate
