"""Work that would hold the event loop too long, handed to a thread."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

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
