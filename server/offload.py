"""Work that would hold the event loop too long, handed to a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from .errors import RETRY_AFTER_S, TooManyRequests

T = TypeVar("T")

# Below this a JSON body parses in well under a millisecond: cheaper inline than a hop to a thread.
INLINE_JSON_MAX_BYTES = 64 * 1024


async def parse_json_body(body: bytes, parse: Callable[[bytes], T], *, inline: bool = True) -> T:
    """`parse(body)`, on the event loop for a small body (unless `inline` is false), in a thread for a large
    one: a 10 MB tensor takes seconds to parse and check, during which the loop would answer nothing, health
    probes included. (CPython's C JSON scanner still holds the GIL while it runs, a fraction of that time;
    the checks in Python that follow let the loop in every few milliseconds.)"""
    if inline and len(body) <= INLINE_JSON_MAX_BYTES:
        return parse(body)
    return await asyncio.to_thread(parse, body)


async def result_within(job: Future[T], wait_s: float) -> T:
    """The result of work handed to an executor's threads; refused (429) when no thread has taken it up
    within `wait_s`, rather than queueing behind expensive requests without end."""
    result = asyncio.wrap_future(job)
    done, _ = await asyncio.wait({result}, timeout=wait_s)
    if not done and job.cancel():  # still queued: cancelling only succeeds before a thread starts it
        raise TooManyRequests(
            f"no preprocessing thread was free within {wait_s:g} s; retry shortly", retry_after_s=RETRY_AFTER_S
        )
    return await result
