"""Learning-rate schedules: their values per optimizer step."""

import math

import pytest

from builder.schedules import warmup_cosine


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    values = [warmup_cosine(step, warmup_steps=4, total_steps=14) for step in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0
    assert values[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert warmup_cosine(14, warmup_steps=4, total_steps=14) == pytest.approx(0.0)
