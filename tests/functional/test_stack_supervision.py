"""`python -m stack` (make serve) as a user runs it, with real Triton and the gateway on loopback: a process
that dies is started again while the gateway answers 503 with Retry-After and then serves again by
itself, and SIGTERM stops everything, leaving no process and no shared memory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.shared_memory import SHM_DIRECTORY
from stack.launcher import _die_with_parent, free_port, is_gateway_command, python_env_dirs, remove_regions
from stack.settings import TritonSettings
from stack.supervisor import RestartCounter, RestartPolicy, local_stack

from .conftest import MODEL, metric
from .test_failures import post_png, wait_for

# Bounds for a loaded machine, never asserted as timings: how long a stack may take to be ready again.
READY_TIMEOUT_S = 240.0
ROOT = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None when the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def _live_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies aside) in process group `pgid`: a server and any stub processes it spawned."""
    return [pid for pid in _live_pids() if (fields := _stat(pid)) is not None and int(fields[2]) == pgid]


def regions(prefix: str) -> list[Path]:
    return sorted(Path(SHM_DIRECTORY).glob(f"{prefix}*"))


class Stack:
    """`python -m stack` on free loopback ports, its output in a log file."""

    def __init__(self, repository: Path, cache_dir: Path, log_path: Path) -> None:
        self.gateway_port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "TRITON_HTTP_PORT": str(free_port()),
            "TRITON_GRPC_PORT": str(free_port()),
            "TRITON_METRICS_PORT": str(free_port()),
            "TRITON_CACHE_DIR": str(cache_dir),
            "TRITON_REPOSITORY_POLL_S": "1",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.gateway_port),
            "GATEWAY_TRITON_TIMEOUT_S": "5",
            "GATEWAY_MODEL_INFO_TTL_S": "0.5",
            "GATEWAY_DRAIN_S": "1",
            "STACK_METRICS_PORT": str(self.metrics_port),
        }
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stack", "--repository", str(repository)],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.seen: dict[int, list[str]] = {}  # every child seen, for the clean-up after a failure

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def child(self, name: str) -> int | None:
        """The pid of the stack's live tritonserver or gateway process."""
        for pid in _live_pids():
            fields = _stat(pid)
            if fields is None or int(fields[1]) != self.process.pid:
                continue
            command = _cmdline(pid)
            if (name == "tritonserver" and command[0].endswith("/tritonserver")) or (
                name == "gateway" and is_gateway_command(command)
            ):
                self.seen[pid] = command
                return pid
        return None

    def region_prefix(self, triton_pid: int) -> str:
        (option,) = [part for part in _cmdline(triton_pid) if "shm-region-prefix-name=" in part]
        return option.split("shm-region-prefix-name=", 1)[1]

    def ready(self) -> bool:
        assert self.process.poll() is None, f"the stack exited with {self.process.returncode}:\n{self.log_tail()}"
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def restarts(self, process: str, reason: str = "crashed") -> float | None:
        url = f"http://127.0.0.1:{self.metrics_port}"
        return metric(url, "stack_process_restarts_total", process=process, reason=reason)

    def close(self) -> None:
        """Stop the stack whatever state it is in, and remove whatever it left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, command in self.seen.items():
            for member in group_members(pid):
                os.kill(member, signal.SIGKILL)
            for part in command:
                if "shm-region-prefix-name=" in part:
                    remove_regions(part.split("shm-region-prefix-name=", 1)[1])
            remove_regions(f"gateway-{pid}-")
        self._log.close()


def classify(url: str, photo: Path) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{MODEL}/classify",
        content=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )


@pytest.fixture(scope="module")
def stack_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack-cache")  # one copy of the backends for every stack here


def test_killed_processes_are_started_again_and_the_gateway_serves_meanwhile(repository, stack_cache, photos, tmp_path):
    jpeg = next(p for p in photos if p.suffix in (".jpg", ".jpeg"))
    stack = Stack(repository, stack_cache, tmp_path / "stack.log")
    try:
        assert wait_for(stack.ready, READY_TIMEOUT_S), stack.log_tail()
        assert classify(stack.url, jpeg).status_code == 200
        triton_pid = stack.child("tritonserver")
        assert triton_pid is not None
        prefix = stack.region_prefix(triton_pid)
        assert regions(prefix), "Triton's Python backend made no region under the prefix it was given"

        os.kill(triton_pid, signal.SIGKILL)
        assert wait_for(lambda: _stat(triton_pid) is None)
        statuses: list[int] = []

        def served_again() -> bool:
            assert stack.process.poll() is None, f"the stack exited with {stack.process.returncode}"
            answer = classify(stack.url, jpeg)
            statuses.append(answer.status_code)
            # While Triton is gone: 503 with Retry-After, never another 5xx.
            assert answer.status_code in (200, 503), (answer.status_code, answer.text, stack.log_tail())
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] and answer.json()["error"]["code"] == "triton_unavailable"
            return answer.status_code == 200

        assert wait_for(served_again, READY_TIMEOUT_S), stack.log_tail()
        assert statuses[0] == 503
        assert stack.restarts("tritonserver") == 1 and stack.restarts("gateway") == 0
        new_triton = stack.child("tritonserver")
        assert new_triton not in (None, triton_pid)
        assert not regions(prefix), "the dead server's shared memory was left in /dev/shm"
        assert not group_members(triton_pid), "a stub process of the dead server outlived it"
        assert regions(stack.region_prefix(new_triton))  # the new server's, under a prefix of its own

        # The gateway registers its input region with the new server: inputs go through shared memory again.
        def through_shared_memory() -> bool:
            before = metric(stack.url, "gateway_triton_inputs_total", transport="shared_memory") or 0.0
            assert classify(stack.url, jpeg).status_code == 200
            return (metric(stack.url, "gateway_triton_inputs_total", transport="shared_memory") or 0.0) > before

        assert wait_for(through_shared_memory), stack.log_tail()

        gateway_pid = stack.child("gateway")
        assert gateway_pid is not None and list(Path(SHM_DIRECTORY).glob(f"gateway-{gateway_pid}-*"))
        os.kill(gateway_pid, signal.SIGKILL)
        assert wait_for(lambda: stack.child("gateway") not in (None, gateway_pid) and stack.ready(), READY_TIMEOUT_S)
        assert classify(stack.url, jpeg).status_code == 200
        assert stack.restarts("gateway") == 1 and stack.restarts("tritonserver") == 1
        assert not list(Path(SHM_DIRECTORY).glob(f"gateway-{gateway_pid}-*"))

        # SIGTERM to the gateway alone: it drains and exits with code 0, is started again, and counted as
        # having exited, not as a crash.
        gateway_pid = stack.child("gateway")
        assert gateway_pid is not None
        os.kill(gateway_pid, signal.SIGTERM)
        assert wait_for(lambda: stack.child("gateway") not in (None, gateway_pid) and stack.ready(), READY_TIMEOUT_S)
        assert classify(stack.url, jpeg).status_code == 200
        assert stack.restarts("gateway", "exited") == 1 and stack.restarts("gateway") == 1, stack.log_tail()
    finally:
        stack.close()


def test_sigterm_stops_the_stack_at_any_moment_and_leaves_nothing_behind(repository, stack_cache, tmp_path):
    # The signal lands at a different point each time: while Triton loads its models, while serving, and
    # twice in a row (the second stops without waiting).
    for moment in ("starting", "serving", "serving, signalled twice"):
        stack = Stack(repository, stack_cache, tmp_path / f"stack-{moment}.log")
        try:
            if moment == "starting":
                assert wait_for(lambda s=stack: s.child("tritonserver") is not None, READY_TIMEOUT_S), stack.log_tail()
            else:
                assert wait_for(stack.ready, READY_TIMEOUT_S), stack.log_tail()
            triton_pid, gateway_pid = stack.child("tritonserver"), stack.child("gateway")
            assert triton_pid is not None
            prefix = stack.region_prefix(triton_pid)

            stack.process.send_signal(signal.SIGTERM)
            if moment.endswith("twice"):
                stack.process.send_signal(signal.SIGTERM)
            try:
                code = stack.process.wait(timeout=READY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{moment}: the stack did not stop after SIGTERM:\n{stack.log_tail()}")
            assert code == 0, (moment, stack.log_tail())
            for pid in (triton_pid, gateway_pid):
                if pid is not None:
                    assert not group_members(pid), f"{moment}: a process of group {pid} outlived the stack"
            assert not regions(prefix), f"{moment}: Triton's shared memory was left in /dev/shm"
            if gateway_pid is not None:
                assert not list(Path(SHM_DIRECTORY).glob(f"gateway-{gateway_pid}-*"))
        finally:
            stack.close()


def test_the_stack_of_make_demo_and_make_loadtest_restarts_a_killed_triton(repository, stack_cache):
    settings = TritonSettings(
        model_repository=str(repository),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        cache_dir=str(stack_cache),
        repository_poll_s=1,
    )
    restarts = RestartCounter(["tritonserver", "gateway"])
    before = python_env_dirs()
    with local_stack(
        settings, gateway_port=free_port(), policy=lambda: RestartPolicy(backoff_s=0.2), restarts=restarts
    ) as (triton, gateway):
        assert post_png(gateway.url).status_code == 200
        killed = triton.pid
        assert killed is not None
        prefix, env_dir = triton.shm_region_prefix, triton.python_env_dir
        assert_claimed_as_the_rule_says(env_dir, python_env_dirs() - before)
        before = python_env_dirs()
        os.killpg(killed, signal.SIGKILL)
        assert wait_for(lambda: triton.pid != killed and post_png(gateway.url).status_code == 200, READY_TIMEOUT_S), (
            triton.log_tail()
        )
        assert restarts.value("tritonserver", "crashed") == 1 and restarts.value("gateway") == 0
        assert not group_members(killed) and not regions(prefix)
        if env_dir is not None:
            assert not env_dir.exists(), "the killed server's Python backend folder was left in /tmp"
        # The gateway can answer before the supervisor's thread, on its own poll, has seen the new server
        # ready and tried to claim its folder: wait for that try rather than read the claim at once.
        assert wait_for(lambda: triton._env_dirs_at_launch is None, READY_TIMEOUT_S)
        assert_claimed_as_the_rule_says(triton.python_env_dir, python_env_dirs() - before)


def assert_claimed_as_the_rule_says(claimed: Path | None, appeared: set[Path]) -> None:
    """A Triton's Python-backend folder is told apart by time (stack/launcher.py): it claims the one folder
    that appeared while it started, or none where another server on this machine made one at that moment."""
    if claimed is not None:
        assert claimed in appeared and claimed.is_dir() and claimed.name.startswith("python_env_")
    else:
        assert len(appeared) >= 2, f"no folder claimed, though only {sorted(appeared)} appeared"
