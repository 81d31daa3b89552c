"""Large images through the real stack: a per-request pixel limit, a bound on large decodes at once that
keeps a thread for small requests, and memory handed back after a large decode."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from ..conftest import transparent_png
from .conftest import MODEL, metric, start_gateway

CLASSIFY = f"/v1/models/{MODEL}/classify"
DECODED_BYTES = 6324 * 6324 * 4  # one 40-megapixel RGBA image


def memory(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and at its highest (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if line.startswith(("VmRSS", "VmHWM"))
        }


def as_multipart(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def two_thread_gateway(triton, tmp_path_factory):
    """Two preprocessing threads, as on a two-core host, and one large decode at a time."""
    process = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("decode-limits") / "gateway.log",
        triton.http_url,
        GATEWAY_PREPROCESS_THREADS="2",
        GATEWAY_MAX_LARGE_DECODES="1",
    )
    yield process
    process.stop()


def test_a_request_over_the_pixel_limit_is_refused_with_413_before_decoding(two_thread_gateway, huge_transparent_png):
    before = memory(two_thread_gateway.pid)
    # Three 40-megapixel PNGs, 0.6 MB in all: 120 million pixels against the default 100 million.
    response = httpx.post(
        f"{two_thread_gateway.url}{CLASSIFY}", timeout=60, files=as_multipart(*[huge_transparent_png] * 3)
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and "per request" in error["message"]
    assert memory(two_thread_gateway.pid)["VmHWM"] - before["VmHWM"] < DECODED_BYTES / 2  # nothing decoded


def test_large_decodes_past_the_bound_are_refused_and_small_requests_keep_a_thread(
    two_thread_gateway, huge_transparent_png, photos
):
    url, pid = two_thread_gateway.url, two_thread_gateway.pid
    photo = photos[0].read_bytes()
    assert (
        httpx.post(f"{url}{CLASSIFY}", content=photo, headers={"Content-Type": "image/jpeg"}, timeout=30).status_code
        == 200
    )
    before = memory(pid)

    def timed_post(**kwargs) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = httpx.post(f"{url}{CLASSIFY}", timeout=120, **kwargs)
        return response, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        # Two requests of two 40-megapixel PNGs each at once: enough, unbounded, to hold both threads.
        large = [
            clients.submit(timed_post, files=as_multipart(huge_transparent_png, huge_transparent_png)) for _ in range(2)
        ]
        time.sleep(0.5)
        small = [timed_post(content=photo, headers={"Content-Type": "image/jpeg"}) for _ in range(3)]
        answered = sorted((future.result() for future in large), key=lambda answer: answer[0].status_code)

    (served, _), (refused, _) = answered
    assert [served.status_code, refused.status_code] == [200, 429], refused.text
    assert refused.json()["error"]["code"] == "too_many_requests" and refused.headers["Retry-After"]
    assert all(response.status_code == 200 for response, _ in small)
    after = memory(pid)
    # One large image decoded at a time, converted band by band: well under two of its decoded size.
    assert after["VmHWM"] - before["VmRSS"] < 2 * DECODED_BYTES, after
    # And handed back to the system once done.
    assert after["VmRSS"] - before["VmRSS"] < DECODED_BYTES / 2, after


def test_many_images_just_under_large_count_as_large_in_all(two_thread_gateway):
    # 25 images of just under 4 megapixels: none large alone, 100 million pixels in all.
    near_large = transparent_png(1999)
    with concurrent.futures.ThreadPoolExecutor(2) as clients:
        answers = [
            clients.submit(
                httpx.post, f"{two_thread_gateway.url}{CLASSIFY}", timeout=120, files=as_multipart(*[near_large] * 25)
            )
            for _ in range(2)
        ]
        statuses = sorted(answer.result().status_code for answer in answers)
    refused = max((answer.result() for answer in answers), key=lambda response: response.status_code)
    assert statuses == [200, 429], refused.text[:200]
    assert refused.json()["error"]["code"] == "too_many_requests" and refused.headers["Retry-After"]


@pytest.fixture(scope="module")
def one_thread_gateway(triton, tmp_path_factory):
    """One preprocessing thread, and a short wait for it."""
    process = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("pool-wait") / "gateway.log",
        triton.http_url,
        GATEWAY_PREPROCESS_THREADS="1",
        GATEWAY_PREPROCESS_WAIT_S="0.5",
    )
    yield process
    process.stop()


def test_a_request_that_waits_too_long_for_a_preprocessing_thread_is_refused(one_thread_gateway, huge_transparent_png):
    url = one_thread_gateway.url
    small = transparent_png(64)
    handed = metric(url, "gateway_preprocessing_total", where="thread_pool") or 0.0
    with concurrent.futures.ThreadPoolExecutor(1) as clients:
        # Holds the only thread for seconds: two 40-megapixel decodes.
        large = clients.submit(
            httpx.post, f"{url}{CLASSIFY}", timeout=120, files=as_multipart(huge_transparent_png, huge_transparent_png)
        )
        # Sent once the large one is in the pool's queue (counted when handed over), so it waits behind it.
        deadline = time.monotonic() + 60
        while (metric(url, "gateway_preprocessing_total", where="thread_pool") or 0.0) == handed:
            assert time.monotonic() < deadline and not large.done(), "the large request never reached the pool"
            time.sleep(0.02)
        waited = httpx.post(f"{url}{CLASSIFY}", content=small, headers={"Content-Type": "image/png"}, timeout=60)
        assert large.result().status_code == 200
    assert waited.status_code == 429, waited.text[:200]
    assert waited.json()["error"]["code"] == "too_many_requests" and waited.headers["Retry-After"]
    # The thread is free again: the next one is served.
    assert (
        httpx.post(f"{url}{CLASSIFY}", content=small, headers={"Content-Type": "image/png"}, timeout=60).status_code
        == 200
    )
