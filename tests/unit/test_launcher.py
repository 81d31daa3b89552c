"""The gateway process's environment: allocator defaults under whatever the caller sets."""

import pytest

from server.settings import GATEWAY_MALLOC_ENV
from stack.launcher import GatewayProcess, LaunchError


def test_gateway_environment_has_the_allocator_defaults_and_lets_the_caller_override_them(monkeypatch, tmp_path):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # from the caller's own environment
    gateway = GatewayProcess(env={"GATEWAY_TRITON_PROTOCOL": "http"}, log_path=tmp_path / "gateway.log")
    env = gateway.environment()
    assert env["MALLOC_MMAP_THRESHOLD_"] == GATEWAY_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1048576"
    assert env["GATEWAY_TRITON_PROTOCOL"] == "http"
    explicit = GatewayProcess(env={"MALLOC_MMAP_THRESHOLD_": "131072"}, log_path=tmp_path / "gateway.log")
    assert explicit.environment()["MALLOC_MMAP_THRESHOLD_"] == "131072"


def _command_of(gateway: GatewayProcess, monkeypatch) -> list[str]:
    spawned = {}
    monkeypatch.setattr(gateway, "_spawn", lambda command, env: spawned.update(command=command))
    monkeypatch.setattr(gateway, "_wait_until", lambda url, timeout_s: None)
    gateway.start()
    return spawned["command"]


def test_the_gateway_runs_with_its_connection_limit(monkeypatch, tmp_path):
    monkeypatch.delenv("GATEWAY_MAX_CONNECTIONS", raising=False)
    command = _command_of(GatewayProcess(log_path=tmp_path / "gateway.log"), monkeypatch)
    assert command[command.index("--limit-concurrency") + 1] == "1024"
    command = _command_of(GatewayProcess(env={"GATEWAY_MAX_CONNECTIONS": "7"}, log_path=tmp_path / "g.log"),
                          monkeypatch)
    assert command[command.index("--limit-concurrency") + 1] == "7"
    with pytest.raises(LaunchError, match="GATEWAY_MAX_CONNECTIONS"):
        _command_of(GatewayProcess(env={"GATEWAY_MAX_CONNECTIONS": "0"}, log_path=tmp_path / "g.log"), monkeypatch)
