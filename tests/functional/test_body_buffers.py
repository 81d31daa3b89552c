"""Bounds on what many clients at once can make the gateway hold: bodies buffered in memory, connections,
and the gateway's refusal of /v2 JSON that Triton cannot read. Raw sockets, as in test_hostile_clients."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import pytest

from server.launcher import GatewayProcess, LaunchError, free_port

from .conftest import MODEL, metric, start_gateway
from .test_hostile_clients import V2_INFER, connect, raw_request, response_of, send_head

CLASSIFY = f"/v1/models/{MODEL}/classify"
MIB = 1024 * 1024
BODY_LIMIT = 8 * MIB
BUFFER_LIMIT = 4 * BODY_LIMIT
BODY_TIMEOUT_S = 3


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# Defect: a key source that held no key left the gateway open to all.
@pytest.mark.parametrize("env", [{"GATEWAY_API_KEYS": " , "}, {"GATEWAY_API_KEYS_FILE": "EMPTY"}],
                         ids=["keys of blanks", "an empty keys file"])
def test_the_gateway_refuses_to_start_on_a_key_source_without_keys(tmp_path, env):
    empty = tmp_path / "keys"
    empty.write_text("\n  \n")
    env = {name: str(empty) if value == "EMPTY" else value for name, value in env.items()}
    gateway = GatewayProcess(port=free_port(), log_path=tmp_path / "gateway.log", env=env, startup_timeout_s=30)
    with pytest.raises(LaunchError, match="exited"):
        gateway.start()
    gateway.stop()
    log = gateway.log_path.read_text()
    assert "holds no API key" in log, log
    assert "Traceback" not in log, log
