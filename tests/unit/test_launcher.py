"""The local stack's launcher: the gateway process's environment, and how any child is started, stopped,
and cleaned up (small Python children stand in for the servers)."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.settings import GATEWAY_MALLOC_ENV
from stack import launcher
from stack.launcher import GatewayProcess, LaunchError, TritonServer, _ManagedProcess, free_port, remove_regions


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


def test_the_gateway_runs_under_its_own_entry_point_on_the_launchers_host_and_port(monkeypatch, tmp_path):
    spawned = {}
    gateway = GatewayProcess(host="127.0.0.1", port=8123, env={"GATEWAY_PORT": "9"}, log_path=tmp_path / "g.log")
    monkeypatch.setattr(gateway, "_spawn", lambda command, env: spawned.update(command=command, env=env))
    monkeypatch.setattr(gateway, "_wait_until", lambda url, timeout_s: None)
    gateway.start()
    # server/serve.py reads every uvicorn option (workers, connection limit) from the gateway's settings.
    assert spawned["command"] == [sys.executable, "-m", "server"]
    assert (spawned["env"]["GATEWAY_HOST"], spawned["env"]["GATEWAY_PORT"]) == ("127.0.0.1", "8123")


# ------------------------------------------------------------------------- the managed child process

CHILD_TIMEOUT_S = 20


class PythonChild(_ManagedProcess):
    """A small Python program run as the launcher runs its servers; ready once `url` answers 200."""

    name = "child"

    def __init__(self, log_path: Path, code: str, url: str = "", startup_timeout_s: float = CHILD_TIMEOUT_S) -> None:
        super().__init__(log_path)
        self.code, self.url, self.startup_timeout_s = code, url, startup_timeout_s

    def start(self) -> None:
        self._spawn([sys.executable, "-c", self.code], dict(os.environ))
        if self.url:
            self._wait_until(self.url, self.startup_timeout_s)

    def wait_for_line(self, text: str) -> None:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while text not in self.log_tail():
            assert self.running(), self.log_tail()
            assert time.monotonic() < deadline, f"{text!r} never came; log: {self.log_tail()}"
            time.sleep(0.02)


IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(60)
"""


@pytest.mark.spawns
def test_stop_sends_sigterm_and_then_sigkill_to_a_child_that_ignores_it(tmp_path, caplog):
    child = PythonChild(tmp_path / "child.log", IGNORES_SIGTERM)
    child.start()
    try:
        child.wait_for_line("ignoring SIGTERM")
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="stack.launcher"):
            child.stop(timeout_s=0.5)
        assert 0.5 <= time.monotonic() - started < 10
        assert not child.running() and child._process.returncode == -signal.SIGKILL
        assert "did not stop in" in caplog.text and "killing it" in caplog.text
    finally:
        child.stop(timeout_s=0)


@pytest.mark.spawns
def test_stop_ends_a_well_behaved_child_with_sigterm(tmp_path):
    child = PythonChild(tmp_path / "child.log", "import time; print('up', flush=True); time.sleep(60)")
    child.start()
    child.wait_for_line("up")
    child.stop(timeout_s=CHILD_TIMEOUT_S)
    assert child._process.returncode == -signal.SIGTERM


@pytest.mark.spawns
def test_a_child_that_exits_before_it_is_ready_is_a_launch_error_with_its_last_lines(tmp_path):
    child = PythonChild(
        tmp_path / "child.log",
        "import sys; print('no model repository', flush=True); sys.exit(3)",
        url=f"http://127.0.0.1:{free_port()}/ready",
    )
    with pytest.raises(LaunchError, match="child exited with code 3 before it was ready") as error:
        child.start()
    assert "no model repository" in str(error.value)
    child.stop()


@pytest.mark.spawns
def test_a_child_that_is_not_ready_in_time_is_a_launch_error_and_stopped(tmp_path):
    child = PythonChild(
        tmp_path / "child.log",
        "import time; time.sleep(60)",
        url=f"http://127.0.0.1:{free_port()}/ready",
        startup_timeout_s=1,
    )
    with pytest.raises(LaunchError, match=r"child was not ready at http://127\.0\.0\.1:\d+/ready within 1 s"):
        child.start()
    assert not child.running()


PARENT = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from stack.launcher import _ManagedProcess

child = _ManagedProcess(Path(sys.argv[1]))
child._spawn([sys.executable, "-c", "import time; time.sleep(60)"], {{}})
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited; left unreaped where nothing reaps orphans


@pytest.mark.spawns
def test_a_child_dies_with_its_parent_even_when_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log")], stdout=subprocess.PIPE, text=True
    )
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.kill()  # no chance to stop its child
        parent.wait(timeout=CHILD_TIMEOUT_S)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not _gone(child_pid):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_the_repository_key_is_masked_in_the_logged_command_line(tmp_path, monkeypatch, caplog):
    key = "s3cret-key-value"
    server = TritonServer(model_repository=tmp_path, cache_dir=tmp_path / "cache", repository_api_key=key)
    command = server.command(tmp_path / "backends")
    assert any(key in part for part in command)  # Triton itself is given the key
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *args, **kwargs: None)
    with caplog.at_level(logging.INFO, logger="stack.launcher"):
        server._spawn(command, {})
    server._log_file.close()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting tritonserver")]
    assert key not in line
    assert "--http-restricted-api=***" in line and "--grpc-restricted-protocol=***" in line
    assert f"--model-repository={tmp_path}" in line


# --------------------------------------------------------------------- what a dead server leaves behind


def test_every_triton_start_names_its_own_python_backend_regions(tmp_path, monkeypatch):
    server = TritonServer(model_repository=tmp_path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(launcher, "prepare_backends", lambda cache_dir: tmp_path / "backends")
    monkeypatch.setattr(launcher, "pytriton_home", lambda: tmp_path)
    commands = []
    monkeypatch.setattr(server, "_spawn", lambda command, env: commands.append(command))
    server.launch()
    server.launch()
    prefixes = [
        part.split("shm-region-prefix-name=", 1)[1]
        for command in commands
        for part in command
        if part.startswith("--backend-config=python,shm-region-prefix-name=")
    ]
    assert len(prefixes) == 2 and prefixes[0] != prefixes[1]
    assert all(p.startswith(launcher.PYTHON_BACKEND_REGION_PREFIX) for p in prefixes)
    assert server.shm_region_prefix == prefixes[1]


LEAVES_A_REGION = """
import os, sys, time
open("/dev/shm/" + sys.argv[1].format(pid=os.getpid()), "wb").write(b"x" * 4096)
print("made it", flush=True)
time.sleep(60)
"""


def _spawn_leaving(process, name: str) -> None:
    process._spawn([sys.executable, "-c", LEAVES_A_REGION, name], dict(os.environ))
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while "made it" not in process.log_tail():
        assert time.monotonic() < deadline, process.log_tail()
        time.sleep(0.02)


@pytest.mark.spawns
def test_a_killed_tritons_regions_are_removed_and_no_one_elses(tmp_path):
    server = TritonServer(model_repository=tmp_path, cache_dir=tmp_path / "cache")
    other = Path("/dev/shm") / f"{launcher.PYTHON_BACKEND_REGION_PREFIX}{os.getpid()}_other_1"
    other.write_bytes(b"another server's")
    try:
        _spawn_leaving(server, f"{server.shm_region_prefix}1")
        os.kill(server.pid, signal.SIGKILL)  # no chance to free anything
        server._process.wait()
        assert (Path("/dev/shm") / f"{server.shm_region_prefix}1").exists()
        server.stop()
        assert not list(Path("/dev/shm").glob(f"{server.shm_region_prefix}*"))
        assert other.exists()
    finally:
        other.unlink()
        server.stop(timeout_s=0)


@pytest.mark.spawns
def test_a_killed_gateways_region_is_removed(tmp_path):
    gateway = GatewayProcess(log_path=tmp_path / "gateway.log")
    _spawn_leaving(gateway, "gateway-{pid}-feedfacecafe")  # named with the child's pid, as the gateway does
    region = Path("/dev/shm") / f"gateway-{gateway.pid}-feedfacecafe"
    try:
        os.kill(gateway.pid, signal.SIGKILL)
        gateway._process.wait()
        gateway.stop()
        assert not region.exists()
    finally:
        region.unlink(missing_ok=True)
        gateway.stop(timeout_s=0)


@pytest.mark.spawns
def test_a_forced_stop_does_not_wait_for_the_timeout(tmp_path, caplog):
    child = PythonChild(tmp_path / "child.log", IGNORES_SIGTERM)
    child.start()
    try:
        child.wait_for_line("ignoring SIGTERM")
        with caplog.at_level(logging.INFO, logger="stack.launcher"):
            child.stop(timeout_s=3600, force=lambda: True)
        assert child._process.returncode == -signal.SIGKILL
        assert "stopping child now: killing it" in caplog.text
    finally:
        child.stop(timeout_s=0)


def test_the_gateway_is_given_its_drain_and_its_longest_request_to_stop(tmp_path, monkeypatch):
    # An upload accepted just before SIGTERM may take the whole body timeout, then the Triton calls:
    # the stack must not kill the gateway before the gateway itself gives up on that request.
    monkeypatch.setenv("GATEWAY_DRAIN_S", "3")
    gateway = GatewayProcess(
        log_path=tmp_path / "gateway.log",
        env={"GATEWAY_BODY_TIMEOUT_S": "20", "GATEWAY_PREPROCESS_WAIT_S": "1", "GATEWAY_TRITON_TIMEOUT_S": "4"},
    )
    assert gateway.stop_timeout_s == 3 + (20 + 1 + 3 * 4) + 5
    # A value the gateway would refuse has kept it from starting: nothing to drain.
    assert GatewayProcess(log_path=tmp_path / "g.log", env={"GATEWAY_DRAIN_S": "-1"}).stop_timeout_s == 10.0


LEAVES_A_REGION_AND_AN_ENV_FOLDER = """
import os, sys, tempfile, time
open("/dev/shm/" + sys.argv[1], "wb").write(b"x" * 4096)
for _ in range(int(sys.argv[3])):
    tempfile.mkdtemp(prefix="python_env_", dir=sys.argv[2])  # as the Python backend does in /tmp
print("made it", flush=True)
time.sleep(60)
"""


@pytest.mark.spawns
@pytest.mark.parametrize("seen_ready", [True, False])
@pytest.mark.parametrize("folders", [1, 2])
def test_a_killed_tritons_python_backend_folder_is_removed_and_no_one_elses(tmp_path, monkeypatch, folders, seen_ready):
    envs = tmp_path / "tmp"
    envs.mkdir()
    monkeypatch.setattr(launcher, "PYTHON_ENV_DIRECTORY", envs)
    others = (envs / "python_env_before", envs / "python_env_meanwhile")
    others[0].mkdir()
    server = TritonServer(model_repository=tmp_path, cache_dir=tmp_path / "cache")
    server._env_dirs_at_launch = launcher.python_env_dirs()  # as launch() notes them
    others[1].mkdir()  # another server's, made while this one started
    try:
        server._spawn(
            [sys.executable, "-c", LEAVES_A_REGION_AND_AN_ENV_FOLDER, f"{server.shm_region_prefix}1", str(envs), "1"],
            dict(os.environ),
        )
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while "made it" not in server.log_tail():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.02)
        if folders == 1:
            others[1].rmdir()  # only this server's folder is new
        if seen_ready:
            server._claim_python_env_dir()
        # else: killed while starting, before anyone asked whether it was ready
        os.kill(server.pid, signal.SIGKILL)
        server._process.wait()
        server.stop()
        left = sorted(p.name for p in envs.iterdir())
        if folders == 1:
            # The one folder that appeared while it started is its own: removed, the older one kept.
            assert left == ["python_env_before"]
        else:
            # Two appeared: which is whose cannot be told, so neither is touched.
            assert len(left) == 3 and server.python_env_dir is None
    finally:
        remove_regions(server.shm_region_prefix)
        server.stop(timeout_s=0)


# Starts a process whose argv[0] is sys.argv[1] (a stub's name) with a region name in its arguments, prints
# its pid, and exits at once (its child an orphan) or stays (its child's parent). sys.argv[4]: the Python to
# run, which a process given another argv[0] cannot tell by itself.
SPAWNS_NAMED = """
import subprocess, sys, time
stub = subprocess.Popen([sys.argv[1], "-c", "import time; time.sleep(60)", sys.argv[2]], executable=sys.argv[4])
print(stub.pid, flush=True)
if sys.argv[3] == "stay":
    time.sleep(60)
"""


def _named_process(name: Path, region: str, parent: str, parent_name: str = "launcher") -> tuple[int, subprocess.Popen]:
    """(pid of a process called `name` naming `region`, the process that started it, called `parent_name`)."""
    starter = subprocess.Popen(
        [parent_name, "-c", SPAWNS_NAMED, str(name), region, parent, sys.executable],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
    )
    return int(starter.stdout.readline()), starter


@pytest.mark.spawns
# Its orphan stub is one that any Triton start on the machine removes (TritonServer.launch), so under
# pytest-xdist it runs in the process that starts the real-stack tests' servers, never beside one of them.
@pytest.mark.xdist_group("servers")
def test_stubs_and_regions_of_a_killed_launcher_are_removed_at_the_next_start_and_no_one_elses(tmp_path):
    # A launcher killed outright (SIGKILL) while its Triton loaded models: the stubs were left running,
    # orphaned, with their shared memory. Its pid, in their region prefix, is no longer running.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stub = tmp_path / launcher.PYTHON_BACKEND_STUB  # how the backend names it (argv[0])
    dead = f"{launcher.PYTHON_BACKEND_REGION_PREFIX}{gone.pid}_0a1b2c3d_"
    # The same pid, from another PID namespace sharing /dev/shm: its server runs, seen here under another pid.
    elsewhere = f"{launcher.PYTHON_BACKEND_REGION_PREFIX}{gone.pid}_4e5f6a7b_"
    running = f"{launcher.PYTHON_BACKEND_REGION_PREFIX}{os.getpid()}_0a1b2c3d_"
    regions = [Path("/dev/shm") / f"{prefix}stub-1" for prefix in (dead, elsewhere, running)]
    started: list[subprocess.Popen] = []
    pids: list[int] = []
    try:
        for region in regions:
            region.write_bytes(b"x" * 4096)
        for region, parent, parent_name in (
            (regions[0], "exit", "launcher"),  # orphaned
            (regions[1], "stay", "tritonserver"),  # its server runs
            (regions[2], "exit", "launcher"),  # orphaned, but its launcher (this process) runs
        ):
            pid, starter = _named_process(stub, region.name, parent, parent_name)
            pids.append(pid)
            started.append(starter)
        started[0].wait()
        started[2].wait()
        assert launcher.remove_dead_launchers_leftovers() == 1
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while launcher._alive(pids[0]) and Path(f"/proc/{pids[0]}").exists():
            assert time.monotonic() < deadline, "the orphan stub was not killed"
            time.sleep(0.02)
        assert not regions[0].exists()
        assert all(Path(f"/proc/{pid}").exists() for pid in pids[1:]) and regions[1].exists() and regions[2].exists()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for starter in started:
            starter.kill()
            starter.wait()
        for region in regions:
            region.unlink(missing_ok=True)


def test_signals_wait_for_a_stop_to_finish_then_interrupt() -> None:
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with launcher.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)  # a second Ctrl-C or SIGTERM while a server is being stopped
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append("the stop")
    assert finished == ["the stop"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # as they were
