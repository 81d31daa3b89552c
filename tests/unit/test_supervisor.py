"""The local stack's supervisor: the restart policy on a clock of the test's own, restarts and stops of
stand-in processes, and the signals that stop it."""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

import pytest

from stack.launcher import LaunchError
from stack.settings import StackSettings, TritonSettings
from stack.supervisor import GaveUp, RestartCounter, RestartPolicy, StopSignals, Supervisor, replica_processes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------- the policy


def test_the_back_off_doubles_up_to_its_cap_and_the_fifth_crash_within_the_window_gives_up():
    clock = Clock()
    policy = RestartPolicy(backoff_s=1, backoff_max_s=5, max_crashes=5, window_s=120, clock=clock)
    delays = []
    for _ in range(4):
        delays.append(policy.crashed())
        clock.now += 10
    assert delays == [1, 2, 4, 5]
    assert policy.crashed() is None


def test_crashes_older_than_the_window_are_forgotten():
    clock = Clock()
    policy = RestartPolicy(backoff_s=1, backoff_max_s=30, max_crashes=5, window_s=120, clock=clock)
    for _ in range(4):
        policy.crashed()
        clock.now += 10
    clock.now += 120  # the last crash was 130 s ago
    assert policy.recent_crashes == 0
    assert policy.crashed() == 1
    # A crash every 31 s keeps at most four in any 120 s: restarted every time, never given up.
    for _ in range(20):
        clock.now += 31
        assert policy.crashed() is not None


def test_the_policy_comes_from_the_stack_settings(monkeypatch):
    monkeypatch.setenv("STACK_RESTART_BACKOFF_S", "0.5")
    monkeypatch.setenv("STACK_MAX_CRASHES", "2")
    policy = RestartPolicy.from_settings(StackSettings(), clock=Clock())
    assert policy.crashed() == 0.5
    assert policy.crashed() is None


# ------------------------------------------------------------------------------ the supervisor


class FakeSignals:
    """Waiting moves the test's clock on; a signal 'arrives' after a given number of waits."""

    def __init__(self, clock: Clock, signal_after_waits: int | None = None) -> None:
        self.clock, self.received, self.waits, self.signal_after_waits = clock, 0, 0, signal_after_waits

    @property
    def stop(self) -> bool:
        return self.received > 0

    @property
    def force(self) -> bool:
        return self.received > 1

    def wait(self, timeout_s: float) -> None:
        self.clock.now += timeout_s
        self.waits += 1
        if self.waits == self.signal_after_waits:
            self.received += 1


class FakeProcess:
    """A process that is ready `ready_after_s` after its launch, and exits when the test kills it."""

    startup_timeout_s = 30.0

    def __init__(self, name: str, clock: Clock, events: list[str], ready_after_s: float = 2.0) -> None:
        self.name, self.clock, self.events, self.ready_after_s = name, clock, events, ready_after_s
        self.log_path = Path(f"{name}.log")
        self.alive, self.launched_at, self.pid, self.code = False, 0.0, 0, 0
        self.forced: list[bool] = []

    def launch(self) -> None:
        self.alive, self.launched_at, self.pid = True, self.clock(), self.pid + 1
        self.events.append(f"launch {self.name}")

    def running(self) -> bool:
        return self.alive

    @property
    def returncode(self) -> int | None:
        return None if self.alive else self.code

    def ready(self) -> bool:
        return self.alive and self.clock() - self.launched_at >= self.ready_after_s

    def kill(self, code: int = -signal.SIGKILL) -> None:
        """Ends it as if it exited with `code` (by itself) or was killed by signal -`code`."""
        self.alive, self.code = False, code

    def stop(self, timeout_s: float | None = None, *, force=None) -> None:
        if self.alive:
            self.alive, self.code = False, -signal.SIGTERM
        self.forced.append(bool(force and force()))
        self.events.append(f"stop {self.name}")

    def log_tail(self) -> str:
        return ""


def _stack(signal_after_waits: int | None = None, **policy):
    clock, events = Clock(), []
    triton, gateway = FakeProcess("tritonserver", clock, events), FakeProcess("gateway", clock, events, 0.5)
    signals = FakeSignals(clock, signal_after_waits)
    supervisor = Supervisor(
        [triton, gateway],  # type: ignore[list-item]
        signals,  # type: ignore[arg-type]
        policy=lambda: RestartPolicy(clock=clock, **policy),
        clock=clock,
    )
    return supervisor, triton, gateway, clock, events


def test_each_process_is_ready_before_the_next_starts():
    supervisor, triton, gateway, clock, events = _stack()
    assert supervisor.start()
    assert events == ["launch tritonserver", "launch gateway"]
    assert gateway.launched_at - triton.launched_at >= triton.ready_after_s


def test_a_process_that_exits_is_started_again_after_its_back_off_and_counted():
    supervisor, triton, gateway, clock, events = _stack(backoff_s=1.0)
    supervisor.start()
    events.clear()
    triton.kill()
    supervisor.check()
    assert events == ["stop tritonserver"]  # what it left behind is cleaned up at once
    clock.now += 0.9
    supervisor.check()
    assert events == ["stop tritonserver"] and supervisor.restarts.value("tritonserver") == 0
    clock.now += 0.1
    supervisor.check()
    assert events == ["stop tritonserver", "launch tritonserver"] and triton.pid == 2
    assert supervisor.restarts.value("tritonserver") == 1 and supervisor.restarts.value("gateway") == 0
    assert gateway.alive  # the gateway stays up meanwhile
    # A second crash waits twice as long.
    clock.now += 5
    supervisor.check()
    triton.kill()
    supervisor.check()
    clock.now += 1.5
    supervisor.check()
    assert triton.pid == 2
    clock.now += 0.5
    supervisor.check()
    assert triton.pid == 3 and supervisor.restarts.value("tritonserver") == 2


def test_the_gateway_is_supervised_too():
    supervisor, triton, gateway, clock, events = _stack()
    supervisor.start()
    gateway.kill()
    supervisor.check()
    clock.now += 1
    supervisor.check()
    assert gateway.alive and gateway.pid == 2 and supervisor.restarts.value("gateway") == 1


def test_a_restart_that_is_never_ready_counts_as_a_crash():
    supervisor, triton, gateway, clock, events = _stack()
    supervisor.start()
    triton.kill()
    supervisor.check()
    triton.ready_after_s = 1e9
    clock.now += 1
    supervisor.check()  # started again
    clock.now += triton.startup_timeout_s + 1
    supervisor.check()
    assert not triton.alive and events[-1] == "stop tritonserver"
    assert supervisor.children[0].policy.recent_crashes == 2


def test_repeated_crashes_give_up_with_one_error_and_exit_1(caplog):
    supervisor, triton, gateway, clock, events = _stack(max_crashes=3, backoff_s=1.0)
    supervisor.start()
    triton.kill()
    supervisor.check()
    clock.now += 1
    supervisor.check()
    triton.kill()
    supervisor.check()
    clock.now += 2
    supervisor.check()
    triton.kill()
    with pytest.raises(GaveUp, match=r"tritonserver was killed by SIGKILL: 3 crashes within 120 s"):
        supervisor.check()


def test_run_exits_1_after_giving_up_and_stops_the_gateway_first(caplog):
    supervisor, triton, gateway, clock, events = _stack(max_crashes=2)
    original_wait = supervisor.signals.wait

    def wait_then_crash(timeout_s: float) -> None:
        original_wait(timeout_s)
        if clock.now > 1010:
            triton.kill()  # every time it is up again

    supervisor.signals.wait = wait_then_crash  # type: ignore[method-assign]
    with caplog.at_level("ERROR", logger="stack.supervisor"):
        assert supervisor.run() == 1
    assert events[-2:] == ["stop gateway", "stop tritonserver"]
    (error,) = [r.getMessage() for r in caplog.records]
    assert "tritonserver was killed by SIGKILL: 2 crashes within 120 s" in error


def test_a_signal_stops_the_gateway_then_triton_and_run_exits_0():
    supervisor, triton, gateway, clock, events = _stack(signal_after_waits=20)
    assert supervisor.run() == 0
    assert events == ["launch tritonserver", "launch gateway", "stop gateway", "stop tritonserver"]
    assert gateway.forced == [False] and triton.forced == [False]


def test_a_second_signal_forces_the_stop():
    supervisor, triton, gateway, clock, events = _stack(signal_after_waits=20)
    supervisor.signals.received = 2  # type: ignore[attr-defined]
    supervisor.stop()
    assert gateway.forced == [True] and triton.forced == [True]


def test_a_signal_while_starting_stops_what_was_started():
    supervisor, triton, gateway, clock, events = _stack(signal_after_waits=3)
    assert supervisor.run() == 0
    assert events == ["launch tritonserver", "stop gateway", "stop tritonserver"]


def test_a_process_that_exits_with_a_failure_code_before_it_is_first_ready_is_a_launch_error():
    supervisor, triton, gateway, clock, events = _stack()
    original_launch = gateway.launch

    def launch_and_fail() -> None:
        original_launch()
        gateway.kill(code=1)  # as uvicorn does when its port is taken or a setting is bad

    gateway.launch = launch_and_fail  # type: ignore[method-assign]
    with pytest.raises(LaunchError, match="gateway exited with code 1 before it was ever ready, so its setup is wrong"):
        supervisor.run()
    assert events == ["launch tritonserver", "launch gateway", "stop gateway", "stop gateway", "stop tritonserver"]


def test_a_process_killed_before_it_is_first_ready_is_started_again():
    # Killed from outside (a user, the OOM killer) a moment after its start, before the first health check
    # answered: no sign of a wrong setup, so it is a crash like any other, not the end of the stack.
    supervisor, triton, gateway, clock, events = _stack(backoff_s=1.0, signal_after_waits=40)
    original_launch = gateway.launch
    launches = 0

    def launch_and_die_the_first_time() -> None:
        nonlocal launches
        launches += 1
        original_launch()
        if launches == 1:
            gateway.kill()

    gateway.launch = launch_and_die_the_first_time  # type: ignore[method-assign]
    assert supervisor.run() == 0
    assert events[:4] == ["launch tritonserver", "launch gateway", "stop gateway", "launch gateway"]
    assert gateway.pid == 2 and supervisor.restarts.value("gateway", "crashed") == 1
    assert supervisor.children[1].policy.recent_crashes == 1


def test_a_process_not_ready_in_time_at_its_first_start_is_a_launch_error():
    supervisor, triton, gateway, clock, events = _stack()
    gateway.ready_after_s = 1e9
    with pytest.raises(LaunchError, match="gateway was not ready within 30 s of its first start"):
        supervisor.run()


def test_a_clean_exit_is_restarted_and_counted_as_exited_never_as_a_crash():
    # A gateway sent SIGTERM on its own drains and exits 0: started again, but no step towards giving up.
    supervisor, triton, gateway, clock, events = _stack(backoff_s=1.0, max_crashes=2)
    supervisor.start()
    for round in range(1, 6):
        gateway.kill(code=0)
        supervisor.check()
        clock.now += 1.0
        supervisor.check()  # started again after the first back-off step, every time
        clock.now += gateway.ready_after_s
        supervisor.check()
        assert gateway.alive and gateway.pid == round + 1
    assert supervisor.restarts.value("gateway", "exited") == 5
    assert supervisor.restarts.value("gateway", "crashed") == 0
    assert supervisor.children[1].policy.recent_crashes == 0
    gateway.kill()  # a crash after all those exits is the first one
    supervisor.check()
    assert supervisor.children[1].policy.recent_crashes == 1


def test_the_restart_counter_starts_at_zero_for_each_process():
    counter = RestartCounter(["tritonserver", "gateway"])
    assert counter.value("tritonserver") == 0 and counter.value("gateway") == 0
    assert (
        counter.registry.get_sample_value("stack_process_restarts_total", {"process": "gateway", "reason": "exited"})
        == 0
    )
    counter.inc("gateway")
    counter.inc("gateway", "exited")
    assert counter.value("gateway") == 2
    assert counter.value("gateway", "crashed") == 1 and counter.value("gateway", "exited") == 1
    counter.close()


# ---------------------------------------------------------------------------------- the signals


def test_a_signal_is_counted_and_wakes_the_waiter_without_a_lock_in_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert not signals.stop
        os.kill(os.getpid(), signal.SIGTERM)
        # The C-level handler has written to the wakeup socket already: a waiter wakes at once.
        readable, _, _ = select.select([signals._reader], [], [], 0)
        assert readable
        signals.wait(60)
        assert signals.stop and not signals.force
        os.kill(os.getpid(), signal.SIGINT)
        signals.wait(60)
        assert signals.force
    assert signal.getsignal(signal.SIGTERM) is previous


# ------------------------------------------------------------------------------------ the replicas


def test_replicas_each_get_ports_a_log_and_a_name_of_their_own_and_the_gateway_routes_over_all(tmp_path, monkeypatch):
    monkeypatch.setenv("STACK_TRITON_REPLICAS", "2")
    settings = TritonSettings(
        model_repository=str(tmp_path), http_port=18000, grpc_port=18001, metrics_port=18002, cache_dir=str(tmp_path)
    )
    tritons, gateway = replica_processes(settings, replicas=StackSettings().triton_replicas)
    first, second = tritons
    assert (first.name, first.grpc_port) == ("tritonserver", 18001) and second.name == "tritonserver-2"
    assert len({first.http_port, first.grpc_port, first.metrics_port, second.http_port, second.grpc_port}) == 5
    assert first.log_path != second.log_path
    assert first.repository_api_key == second.repository_api_key  # one key for the gateway to send to both
    assert gateway.env["GATEWAY_TRITON_GRPC_URL"] == f"{first.grpc_url},{second.grpc_url}"
