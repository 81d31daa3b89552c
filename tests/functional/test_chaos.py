"""The chaos suite's short version (`make chaos` runs every fault, longer): real Triton and the gateway under
`python -m stack` on loopback, steady load, and three faults in turn. Asserts the invariants, never timings:
nothing lost, no 5xx but 503/504 during a fault, only 2xx outside one, nothing but 2xx while publishing."""

from __future__ import annotations

from collections import Counter

import pytest

from builder.publish import versions
from loadtests.chaos import MODEL, Request, Result, Window, check, run_scenarios, time_to_recover, window_requests

SCENARIOS = ("triton-sigkill", "publish", "gateway-drain")


def test_faults_under_load_lose_nothing_and_the_stack_serves_again(tmp_path):
    result = run_scenarios(SCENARIOS, work_dir=tmp_path, duration_s=1.0, quiet_s=1.0, recovery_timeout_s=90.0)

    assert result.violations == []
    assert [w.scenario for w in result.windows] == list(SCENARIOS)
    outcomes = {w.scenario: Counter(r.outcome for r in window_requests(result, w)) for w in result.windows}
    # Each fault happened: the load saw Triton gone and the gateway restart, and the new version is served.
    assert outcomes["triton-sigkill"]["503"] > 0, outcomes
    assert outcomes["gateway-drain"]["503"] + outcomes["gateway-drain"]["refused"] > 0, outcomes
    assert outcomes["publish"]["2xx"] > 0 and set(outcomes["publish"]) == {"2xx"}, outcomes
    assert versions(tmp_path / "model_repository" / MODEL) == [1, 2]


def test_the_invariants_catch_a_lost_request_a_500_and_a_failure_outside_the_faults():
    def request(start: float, status: int | None, failure: str = "") -> Request:
        return Request("steady", start, start + 0.1, status, failure)

    windows = [Window("triton-sigkill", 1.0, 2.0), Window("publish", 3.0, 4.0)]
    requests = [
        request(0.5, 200),
        request(1.2, 503),  # allowed while Triton is gone
        request(1.3, None, "lost"),
        request(1.4, 500),
        request(1.6, 200),
        request(3.5, 503),  # nothing but 2xx while publishing
        request(5.0, 429),  # outside every fault
    ]
    result = Result(requests, windows, origin=0.0)

    assert check(result) == [
        "triton-sigkill: 1 request(s) lost",
        "triton-sigkill: 1 answer(s) other 5xx (500 x1) during the fault",
        "publish: 1 answer(s) 503 during the fault",
        "outside the fault windows: 1 request(s) 429",
    ]
    assert time_to_recover(window_requests(result, windows[0]), windows[0]) == pytest.approx(0.7)
