"""The gateway process's environment: allocator defaults under whatever the caller sets."""

from server.launcher import GATEWAY_MALLOC_ENV, GatewayProcess


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
