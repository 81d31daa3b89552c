"""The soak's short version (`make soak` runs 20,000 requests): a few hundred mixed requests, some bad, against
`python -m stack` on loopback. Invariants, never timings: every answer is the one its kind expects, and at rest
the gateway has the file descriptors, threads and shared-memory free slots it had after the warm-up, with RSS
within a loose bound (a short run measures allocator noise more than leaks)."""

from __future__ import annotations

from loadtests.soak import check, run_soak

LOOSE_RSS_GROWTH = 0.5


def test_a_short_soak_leaves_the_gateway_where_it_was_after_the_warm_up(tmp_path):
    result = run_soak(work_dir=tmp_path, requests=300, warmup=150, clients=2, sample_every_s=1.0, max_seconds=900)

    assert result.outcomes.unexpected(result.kinds) == []
    assert result.soaked == 300
    assert result.end.own_fds == result.baseline.own_fds  # less the pass-through's pooled connections
    assert result.end.pooled <= 2
    assert result.end.threads == result.baseline.threads
    assert result.end.free_slots == result.baseline.free_slots and result.end.free_slots is not None
    assert result.end.free_slots > 0  # the region exists: the slots are in play, not absent
    assert check(result, max_rss_growth=LOOSE_RSS_GROWTH) == []
    # Good and bad input were both part of it.
    statuses = {outcome for (_, outcome) in result.outcomes.counts}
    assert {"200", "400"} <= statuses, statuses
