"""The gateway's request bodies: the budget for bodies held in memory at once."""

import pytest

from server.errors import TooManyRequests
from server.inputs import BufferedBodies


def test_buffered_bodies_refuse_past_the_limit_and_take_back_what_is_released():
    trims = []
    bodies = BufferedBodies(3 << 20, on_large_release=lambda: trims.append(1))
    bodies.reserve(2 << 20)
    with pytest.raises(TooManyRequests) as refused:
        bodies.reserve((1 << 20) + 1)
    assert refused.value.headers()["Retry-After"] and refused.value.headers()["Connection"] == "close"
    bodies.reserve(1 << 20)
    bodies.release(2 << 20)
    assert bodies.held == 1 << 20 and trims == [1]  # a large body's memory handed back
    bodies.release(100)
    assert trims == [1]
