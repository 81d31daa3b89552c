"""The soak's verdict on made-up measurements: each kind of leak, a wrong answer and a short run is named."""

from __future__ import annotations

from collections import Counter

from loadtests.soak import Kind, Outcomes, Sample, SoakResult, check

KINDS = [
    Kind("good", 1, "POST", "/x", frozenset({200})),
    Kind("bad", 1, "POST", "/x", frozenset({400}), bad=True),
]
MIB = 2**20


def result(end: Sample, counts: dict[tuple[str, str], int] | None = None, requested: int = 100) -> SoakResult:
    baseline = Sample(10.0, "at rest", 50, 100 * MIB, 21, 11, 32.0, pooled=1)
    outcomes = Outcomes(Counter(counts or {("good", "200"): 80, ("bad", "400"): 20}), 150)
    return SoakResult(KINDS, outcomes, [baseline, end], baseline, end, requested, 50, 2, 30.0)


def test_a_run_that_comes_back_to_rest_passes():
    assert check(result(Sample(30.0, "at rest", 150, 104 * MIB, 21, 11, 32.0, pooled=1)), max_rss_growth=0.05) == []


def test_leaked_descriptors_threads_slots_and_memory_are_each_named():
    leaky = Sample(30.0, "at rest", 150, 110 * MIB, 24, 12, 31.0, pooled=1)
    assert check(result(leaky), max_rss_growth=0.05) == [
        "open file descriptors at rest (less pooled ones) went from 20 to 23",
        "threads at rest went from 11 to 12",
        "shared-memory free slots at rest went from 32.0 to 31.0",
        "RSS grew 10.0% after the warm-up (100.0 -> 110.0 MiB), more than 5%",
    ]


def test_wrong_answers_lost_requests_and_a_short_run_are_named():
    end = Sample(30.0, "at rest", 140, 100 * MIB, 21, 11, 32.0, pooled=1)
    counts = {("good", "200"): 70, ("good", "500"): 1, ("bad", "400"): 17, ("bad", "200"): 1, ("bad", "lost"): 1}
    assert check(result(end, counts), max_rss_growth=0.05) == [
        "unexpected answers: bad: 1 answered 200 (expected 400)",
        "unexpected answers: bad: 1 got no answer (expected 400)",
        "unexpected answers: good: 1 answered 500 (expected 200)",
        "only 90 of 100 requests within the time limit",
    ]


def test_pooled_connections_to_triton_count_as_leaks_only_past_one_per_client():
    # Two kserve requests overlapped after the warm-up: the pass-through keeps a second idle connection.
    one_more = Sample(30.0, "at rest", 150, 100 * MIB, 22, 11, 32.0, pooled=2)
    assert check(result(one_more), max_rss_growth=0.05) == []
    too_many = Sample(30.0, "at rest", 150, 100 * MIB, 23, 11, 32.0, pooled=3)
    assert check(result(too_many), max_rss_growth=0.05) == [
        "3 pooled connections to Triton at rest, more than the 2 clients"
    ]
