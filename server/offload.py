"""Work that would hold the event loop too long, handed to a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .errors import RETRY_AFTER_S, TooManyRequests

T = TypeVar("T")

# Below this a JSON body parses in well under a millisecond: cheaper inline than a hop to a thread.
INLINE_JSON_MAX_BYTES = 64 * 1024
# Larger bodies are parsed one at a time, in this thread. CPython's C JSON scanner holds the GIL for its
# whole run, so parses in more threads would not go faster; they would only multiply memory: 20 MB of
# `[],[],...` becomes some 500 MB of Python lists, and six at once took the gateway past 2.8 GB. One
# waiting longer than LARGE_JSON_WAIT_S for its turn is refused 429.
LARGE_JSON_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-parse")
LARGE_JSON_WAIT_S = 5.0


async def parse_json_body(body: bytes, parse: Callable[[bytes], T]) -> T:
    """`parse(body)`, on the event loop for a small body, in the large-JSON thread for a large one: a 10 MB
    tensor takes seconds to parse and check, during which the loop would answer nothing, health probes
    included. (The C scanner still holds the GIL while it runs, a fraction of that time; the checks in
    Python that follow let the loop in every few milliseconds.)"""
    if len(body) <= INLINE_JSON_MAX_BYTES:
        return parse(body)
    return await result_within(LARGE_JSON_PARSER.submit(parse, body), LARGE_JSON_WAIT_S, "JSON parsing thread")


async def result_within(job: Future[T], wait_s: float, worker: str = "preprocessing thread") -> T:
    """The result of work handed to an executor's threads; refused (429) when no thread has taken it up
    within `wait_s`, rather than queueing behind expensive requests without end."""
    result = asyncio.wrap_future(job)
    done, _ = await asyncio.wait({result}, timeout=wait_s)
    if not done and job.cancel():  # still queued: cancelling only succeeds before a thread starts it
        raise TooManyRequests(f"no {worker} was free within {wait_s:g} s; retry shortly", retry_after_s=RETRY_AFTER_S)
    return await result
