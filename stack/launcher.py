"""Starting, health-checking and stopping the processes of the local stack.

The only module that spawns processes. `TritonServer` runs the real `tritonserver` binary that the
`nvidia-pytriton` wheel ships, serving a model repository exactly as NVIDIA's container would;
`GatewayProcess` runs the FastAPI gateway under uvicorn.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from server.drain import longest_request_s
from server.serve import remove_metrics_dirs
from server.settings import GATEWAY_MALLOC_ENV, Settings
from server.shared_memory import REGION_PREFIX as GATEWAY_REGION_PREFIX
from server.shared_memory import SHM_DIRECTORY
from server.triton import REPOSITORY_KEY_HEADER

log = logging.getLogger(__name__)


# Triton's API groups (r24.10's names) that answer only to the key's holders. Inference too: a local
# user who reads the gateway's region name in /dev/shm could otherwise run inference with inputs read
# from it and outputs written into it. Logging and trace: they change files the server writes.
# Health, metadata, model config and statistics stay open.
RESTRICTED_APIS = ("model-repository", "shared-memory", "inference", "logging", "trace")

# The Python backend's own name for its regions; each start of ours adds a unique part (see TritonServer).
PYTHON_BACKEND_REGION_PREFIX = "triton_python_backend_shm_region_"


# The Python backend makes one folder for its execution environments when it starts, mkdtemp on a template
# it hard-codes (python_backend src/pb_env.cc, EnvironmentManager), and removes it only when the server
# stops cleanly: a killed server leaves it.
PYTHON_ENV_DIRECTORY = Path("/tmp")
PYTHON_ENV_PREFIX = "python_env_"


def python_env_dirs() -> set[Path]:
    return set(PYTHON_ENV_DIRECTORY.glob(f"{PYTHON_ENV_PREFIX}*"))


class LaunchError(RuntimeError):
    """A server process did not start, or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the parent dies without stopping us (kill -9, crash),
    # the kernel sends SIGTERM, so no orphaned server keeps ports and memory.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def remove_regions(prefix: str) -> int:
    """Unlink every /dev/shm file whose name starts with `prefix`; the bytes they held."""
    freed = 0
    for path in Path(SHM_DIRECTORY).glob(f"{prefix}*"):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed


# The Python backend's stub processes, by their executable's name (python_backend, src/stub_launcher.cc).
PYTHON_BACKEND_STUB = "triton_python_backend_stub"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _processes() -> Iterator[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process this one can see."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            # The parent pid is the field after the command name, which is in parentheses and may hold spaces.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        yield int(entry.name), parent, argv


def remove_dead_launchers_leftovers() -> int:
    """The Python-backend leftovers of Tritons whose launcher was killed outright (SIGKILL: no clean-up ran):
    a Triton killed while it loaded models can leave its stub processes running, orphaned, and their shared
    memory. Each start's region prefix names its launcher's pid (TritonServer._new_region_prefix). A start's
    stubs are killed and its regions removed only when all of these hold: that pid is not running here, no
    process this one can see names the prefix but its stubs, and they are orphans (no tritonserver parent).
    Another PID namespace sharing /dev/shm may reuse the pid, and its processes may be invisible from here:
    what cannot be shown dead is left alone. Returns the stubs killed."""
    suspects = set()  # one prefix per start: <launcher pid>_<token>_
    for path in Path(SHM_DIRECTORY).glob(f"{PYTHON_BACKEND_REGION_PREFIX}*"):
        owner, token, *_ = path.name[len(PYTHON_BACKEND_REGION_PREFIX) :].split("_") + ["", ""]
        if owner.isdigit() and token and not _alive(int(owner)):
            suspects.add(f"{PYTHON_BACKEND_REGION_PREFIX}{owner}_{token}_")
    if not suspects:
        return 0
    processes = list(_processes())
    names = {pid: Path(argv[0]).name for pid, _, argv in processes}
    orphans: dict[str, list[int]] = {}
    alive: set[str] = set()
    for pid, parent, argv in processes:
        found = {prefix for prefix in suspects if any(prefix in arg for arg in argv[1:])}
        if not found:
            continue
        # An orphan's parent is init or a subreaper, not the tritonserver that started it.
        if names[pid] == PYTHON_BACKEND_STUB and names.get(parent) != "tritonserver":
            for prefix in found:
                orphans.setdefault(prefix, []).append(pid)
        else:
            alive |= found  # its server, a stub of a running server, anything else that names it: left alone
    killed = freed = 0
    for prefix, pids in orphans.items():
        if prefix in alive:
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        freed += remove_regions(prefix)
    if killed:
        log.info(
            "removed what killed launchers left: %d Python backend stubs, %.1f MB of shared memory", killed, freed / 1e6
        )
    return killed


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class _ManagedProcess:
    """A child process in its own session, stopped with SIGTERM and then SIGKILL.

    `launch` spawns it and returns at once, `ready` says whether it serves yet; `start` does both, waiting.
    """

    name = "process"
    startup_timeout_s: float = 60.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen | None = None
        self._log_file = None

    def _spawn(self, command: Sequence[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        shown = [part.split("=", 1)[0] + "=***" if "restricted" in part else part for part in command]
        log.info("starting %s: %s", self.name, " ".join(shown))
        self._process = subprocess.Popen(
            list(command),
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def ready_url(self) -> str:
        """The URL that answers 200 once the process serves; empty: ready once running."""
        return ""

    def ready(self) -> bool:
        return self.running() and (not self.ready_url or _http_ok(self.ready_url, timeout_s=0.5))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_until(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise LaunchError(
                    f"{self.name} exited with code {self.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if _http_ok(url):
                return
            time.sleep(0.2)
        self.stop()
        raise LaunchError(f"{self.name} was not ready at {url} within {timeout_s:.0f} s; see {self.log_path}")

    @property
    def stop_timeout_s(self) -> float:
        """How long `stop` waits after SIGTERM before it sends SIGKILL."""
        return 15.0

    def stop(self, timeout_s: float | None = None, *, force: Callable[[], bool] | None = None) -> None:
        """SIGTERM to the whole process group, then SIGKILL once `timeout_s` (default `stop_timeout_s`) has
        passed or as soon as `force()` is true; then whatever the process left behind is removed."""
        process = self._process
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if process is not None and process.poll() is None:
            log.info("stopping %s (pid %d)", self.name, process.pid)
            try:
                os.killpg(process.pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        # Short waits, so that a forced stop does not wait out the whole timeout.
                        process.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                        break
                    except subprocess.TimeoutExpired:
                        if force is not None and force():
                            log.warning("stopping %s now: killing it", self.name)
                        elif time.monotonic() < deadline:
                            continue
                        else:
                            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                        break
            except ProcessLookupError:
                pass
        if process is not None:
            # Stub processes of the Python backend share the group; make sure none outlive the server.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            self._clean_up(process.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _clean_up(self, pid: int) -> None:
        """Remove what the process `pid`, now gone, may have left behind."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def launch(self) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def start(self) -> None:
        """Launch the process and wait until it is ready; LaunchError if it exits first or is late."""
        self.launch()
        if self.ready_url:
            self._wait_until(self.ready_url, self.startup_timeout_s)


def pytriton_home() -> Path:
    """Where the `nvidia-pytriton` wheel keeps the tritonserver binary, backends and stubs."""
    try:
        import pytriton
    except ImportError as e:
        raise LaunchError("the nvidia-pytriton package is not installed; run `make install`") from e
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_backends(cache_dir: Path) -> Path:
    """A writable backend directory whose python backend has the stub for the running Python.

    The wheel keeps one stub per Python version apart from the backend; Triton looks for
    `triton_python_backend_stub` next to `libtriton_python.so`.
    """
    home = pytriton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LaunchError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    backends = cache_dir / f"backends-py{version}"
    marker = backends / "python" / "triton_python_backend_stub"
    if not marker.exists():
        staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=cache_dir))
        shutil.copytree(home / "backends", staging / "backends")
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        if backends.exists():
            shutil.rmtree(backends)
        os.replace(staging / "backends", backends)
        shutil.rmtree(staging, ignore_errors=True)
    return backends


@dataclass
class TritonServer(_ManagedProcess):
    """The real Triton Inference Server on a model repository, bound to loopback by default."""

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "poll"
    repository_poll_s: int = 2
    cache_dir: Path = field(default_factory=lambda: Path(".cache/triton"))
    log_path: Path | None = None
    startup_timeout_s: float = 120.0
    # With a key, Triton answers the APIs of RESTRICTED_APIS only to requests that carry it in the
    # REPOSITORY_KEY_HEADER header; the gateway sends it, and never forwards the repository API.
    repository_api_key: str | None = None
    extra_args: Sequence[str] = ()

    name = "tritonserver"

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.cache_dir = Path(self.cache_dir).resolve()
        if self.log_path is None:
            self.log_path = self.cache_dir / "tritonserver.log"
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ValueError("model_control_mode must be one of none, poll, explicit")
        super().__init__(Path(self.log_path))
        self.shm_region_prefix = self._new_region_prefix()
        # The Python backend's folder of this start (see python_env_dirs); None when it cannot be told apart.
        self.python_env_dir: Path | None = None
        self._env_dirs_at_launch: set[Path] | None = None

    @staticmethod
    def _new_region_prefix() -> str:
        # The Python backend never frees its regions when the server dies unstopped; a prefix of this start's
        # own ("shm-region-prefix-name", python_backend README, "Running Multiple Instances of Triton
        # Server") names exactly the files that are ours to remove once it is gone, whatever else runs here.
        return f"{PYTHON_BACKEND_REGION_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        command = [
            str(pytriton_home() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            # One broken model must not take the others down; the gateway reports it as not ready.
            "--exit-on-error=false",
            # Readiness of each model is the gateway's business; the server is ready once it serves.
            "--strict-readiness=false",
            f"--model-control-mode={self.model_control_mode}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
        ]
        if self.model_control_mode == "poll":
            command.append(f"--repository-poll-secs={self.repository_poll_s}")
        if self.repository_api_key:
            # tritonserver takes options only on its command line (no option file, no environment
            # variable), so the key is readable in /proc/<pid>/cmdline by every local user unless /proc
            # is mounted with hidepid: run Triton under its own user on a shared host (README).
            restriction = f"{','.join(RESTRICTED_APIS)}:{REPOSITORY_KEY_HEADER}={self.repository_api_key}"
            command += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        return command + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = pytriton_home().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The backend stub runs model.py with the Python found on PATH: make it this environment's,
        # so numpy and onnxruntime import.
        python_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join((python_bin, env.get("PATH", "")))
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        return env

    @property
    def ready_url(self) -> str:
        return f"http://{self.http_url}/v2/health/ready"

    def launch(self) -> None:
        if not self.model_repository.is_dir():
            raise LaunchError(f"model repository {self.model_repository} is not a directory")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.cache_dir)
        remove_dead_launchers_leftovers()
        self.shm_region_prefix = self._new_region_prefix()
        self.python_env_dir, self._env_dirs_at_launch = None, python_env_dirs()
        self._spawn(self.command(backends), self.environment())

    def ready(self) -> bool:
        ready = super().ready()
        if ready:
            self._claim_python_env_dir()
        return ready

    def start(self) -> None:
        super().start()
        self._claim_python_env_dir()
        log.info("tritonserver ready: http %s, grpc %s", self.http_url, self.grpc_url)

    def _claim_python_env_dir(self) -> None:
        """Once ready, note which Python-backend folder is this start's, to remove it if the server is killed.

        Nothing in the folder names its server, so it is told by time: the one folder that appeared between
        this launch and this readiness, and only when the backend is known to have started in this server
        (its shared memory is under this start's prefix). Two or more new folders (another server started
        meanwhile) cannot be told apart, and are left alone.
        """
        before, self._env_dirs_at_launch = self._env_dirs_at_launch, None
        if before is None or not any(Path(SHM_DIRECTORY).glob(f"{self.shm_region_prefix}*")):
            return
        new = python_env_dirs() - before
        if len(new) == 1:
            self.python_env_dir = new.pop()
        elif new:
            log.debug("%d Python backend folders appeared while tritonserver started; none is claimed", len(new))

    def _clean_up(self, pid: int) -> None:
        # Killed before anyone saw it ready: its folder, if it made one, is claimed now, by the same rule.
        self._claim_python_env_dir()
        freed = remove_regions(self.shm_region_prefix)
        if freed:
            log.info("removed %.1f MB of shared memory that tritonserver (pid %d) left", freed / 1e6, pid)
        if self.python_env_dir is not None and self.python_env_dir.exists():
            shutil.rmtree(self.python_env_dir, ignore_errors=True)
            log.info("removed %s, which tritonserver (pid %d) left", self.python_env_dir, pid)
        self.python_env_dir = None


# How the stack starts the gateway (server/__main__.py): what tells its process among others.
GATEWAY_MODULE = ("-m", "server")


def is_gateway_command(command: list[str]) -> bool:
    """Whether a process's command line is the gateway's, as the stack starts it."""
    return tuple(command[1:3]) == GATEWAY_MODULE


@dataclass
class GatewayProcess(_ManagedProcess):
    """The gateway under uvicorn, in its own process, configured through the environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path = field(default_factory=lambda: Path(".cache/gateway.log"))
    startup_timeout_s: float = 60.0

    name = "gateway"

    def __post_init__(self) -> None:
        super().__init__(Path(self.log_path))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/healthz"

    def setting(self, name: str) -> Any:
        """GATEWAY_<NAME> as the gateway will read it from its environment (the field's default when unset)."""
        field = Settings.model_fields[name]
        value = {k.upper(): v for k, v in self.environment().items()}.get(f"GATEWAY_{name.upper()}")
        if value is None:
            return field.get_default(call_default_factory=True)
        try:
            return TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        except ValidationError as e:
            raise LaunchError(f"GATEWAY_{name.upper()}={value!r}: {e.errors()[0]['msg']}") from None

    def drain_s(self) -> float:
        """How long the gateway keeps answering after SIGTERM (GATEWAY_DRAIN_S)."""
        return float(self.setting("drain_s"))

    @property
    def stop_timeout_s(self) -> float:
        # The drain period, then as long as the gateway lets a request it accepted take (a body still
        # arriving, a Triton call tried on a second replica), and a little more: an accepted request is
        # answered before the process is killed. A setting the gateway cannot read has kept it from starting.
        try:
            timeouts = ("body_timeout_s", "preprocess_wait_s", "triton_timeout_s")
            in_flight = longest_request_s(Settings.model_construct(**{name: self.setting(name) for name in timeouts}))
            return self.drain_s() + in_flight + 5.0
        except LaunchError:
            return 10.0

    def _clean_up(self, pid: int) -> None:
        # A gateway killed before it could unlink its region leaves it, reserved in full, in /dev/shm; gone
        # from there, a later gateway also has Triton drop its registration (server/triton.py).
        # Its workers' regions too: they are named after the process group, which the gateway leads.
        freed = remove_regions(f"{GATEWAY_REGION_PREFIX}{pid}-")
        remove_metrics_dirs(pid)
        if freed:
            log.info("removed %.1f MB of shared memory that the gateway (pid %d) left", freed / 1e6, pid)

    def environment(self) -> dict[str, str]:
        """This process's environment plus `env`, over the gateway's allocator defaults."""
        return {**GATEWAY_MALLOC_ENV, **os.environ, **self.env}

    def launch(self) -> None:
        # server/serve.py: uvicorn with GATEWAY_WORKERS worker processes (default one per core), every
        # option read from the gateway's settings, here given this process's host and port.
        env = {**self.environment(), "GATEWAY_HOST": self.host, "GATEWAY_PORT": str(self.port)}
        self._spawn([sys.executable, *GATEWAY_MODULE], env)


@contextmanager
def triton_and_gateway(
    repository: Path, folder: Path, gateway_env: dict[str, str] | None = None, repository_poll_s: int = 1
) -> Iterator[tuple[TritonServer, GatewayProcess]]:
    """A Triton on `repository` and one gateway in front of it, on free loopback ports, both stopped on exit.

    For benchmarks and load tests that measure one setting against another: no supervision, no restarts
    (`python -m stack` is the stack users run). Logs and Triton's backends go under `folder`.
    """
    triton = TritonServer(
        model_repository=repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        cache_dir=Path(folder) / "cache",
        repository_poll_s=repository_poll_s,
    )
    gateway = GatewayProcess(
        port=free_port(),
        log_path=Path(folder) / "gateway.log",
        env={
            "GATEWAY_TRITON_GRPC_URL": triton.grpc_url,
            "GATEWAY_TRITON_HTTP_URL": triton.http_url,
            **(gateway_env or {}),
        },
    )
    with sigterm_as_interrupt():
        try:
            triton.start()
            gateway.start()
            yield triton, gateway
        finally:
            try:
                gateway.stop()
            finally:  # a second Ctrl-C while the gateway drains still stops Triton
                with signals_held():
                    triton.stop(timeout_s=5)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C does (KeyboardInterrupt), so that its `finally` clauses run: without
    it a benchmark killed by SIGTERM leaves its temporary folder. Only in the main thread, where signals go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has finished (a stop must not be cut short, or it leaves its
    server running), then interrupt as Ctrl-C does. Only in the main thread, where signals go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        number: signal.signal(number, lambda signum, frame: received.append(signum))
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise KeyboardInterrupt
