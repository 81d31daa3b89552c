"""The chaos suite's short version (`make chaos` runs every fault, longer): real Triton and the gateway under
`python -m stack` on loopback, steady load, and three faults in turn. Asserts the invariants, never timings:
nothing lost, no 5xx but 503/504 during a fault, only 2xx outside one, nothing but 2xx while publishing."""

from __future__ import annotations

from collections import Counter

from builder.publish import versions
from loadtests.chaos import MODEL, run_scenarios, window_requests

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
