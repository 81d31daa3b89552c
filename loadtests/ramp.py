"""The arithmetic of the saturation ramp, apart from locust so that it can be tested on its own."""

from __future__ import annotations

from collections.abc import Mapping


def step_percentile(before: Mapping[int, int], after: Mapping[int, int], quantile: float) -> float | None:
    """The quantile (ms) of the responses recorded between two snapshots of locust's response-time counts.

    Locust keeps, per request name and in total, how many responses took each (rounded) number of
    milliseconds; the difference of two snapshots is the distribution of one step alone.
    """
    counts = {ms: count - before.get(ms, 0) for ms, count in after.items() if count > before.get(ms, 0)}
    total = sum(counts.values())
    if total == 0:
        return None
    seen = 0
    for ms in sorted(counts):
        seen += counts[ms]
        if seen >= quantile * total:
            return float(ms)
    return float(max(counts))
