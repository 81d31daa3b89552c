"""The gateway's shared-memory region for input tensors: slots, their release, and clean refusals."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from server import shared_memory
from server.shared_memory import InputRegion, SharedMemoryUnavailable, input_region, region_exists


@pytest.fixture
def region():
    made = InputRegion(slots=3, slot_bytes=1000)
    yield made
    made.close()


def test_slots_are_aligned_disjoint_and_hold_what_is_written(region):
    assert region.slot_bytes == 1024 and region.size == 3 * 1024
    held = [region.acquire((2, 5, 25), np.float32) for _ in range(3)]
    assert sorted(slot.offset for slot, _ in held) == [0, 1024, 2048]
    for value, (_, array) in enumerate(held):
        assert array.flags.c_contiguous and array.ctypes.data % 64 == 0
        array[...] = value
    for value, (slot, array) in enumerate(held):
        assert (array == value).all()
        assert (region.view[slot.offset : slot.offset + array.nbytes].view(np.float32) == value).all()


def test_no_slot_when_all_are_held_or_the_batch_is_too_big(region):
    assert region.acquire((257,), np.float32) is None  # 1028 bytes
    held = [region.acquire((256,), np.float32) for _ in range(3)]
    assert region.free_slots == 0 and region.acquire((8,), np.uint8) is None
    # Released from another thread, as a preprocessing thread does for an abandoned request.
    thread = threading.Thread(target=region.release, args=(held[1][0],))
    thread.start()
    thread.join()
    assert region.free_slots == 1 and region.acquire((8,), np.uint8)[0] == held[1][0]


def test_the_slot_freed_first_is_handed_out_first(region):
    first, second, third = (region.acquire((8,), np.uint8)[0] for _ in range(3))
    region.release(second)
    region.release(first)
    assert [region.acquire((8,), np.uint8)[0] for _ in range(2)] == [second, first]


def test_close_removes_the_name_even_with_an_array_still_over_it():
    made = InputRegion(slots=1, slot_bytes=64)
    path = os.path.join(shared_memory.SHM_DIRECTORY, made.name)
    _, array = made.acquire((16,), np.float32)
    assert os.path.exists(path) and region_exists(made.key)
    made.close()
    made.close()
    assert not os.path.exists(path) and not region_exists(made.key)
    array[:] = 1.0  # the mapping lives as long as an array over it does
    assert array.sum() == 16
    assert made.acquire((16,), np.float32) is None


def test_a_full_dev_shm_is_a_clean_refusal_with_nothing_left_behind(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = set(os.listdir(shared_memory.SHM_DIRECTORY))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SharedMemoryUnavailable, match="cannot reserve"):
        InputRegion(slots=2, slot_bytes=64)
    assert set(os.listdir(shared_memory.SHM_DIRECTORY)) == before


def test_without_dev_shm_or_slots_there_is_no_region_and_the_reason_is_logged(monkeypatch, tmp_path, caplog):
    assert input_region(0, 1024) is None
    monkeypatch.setattr(shared_memory, "SHM_DIRECTORY", str(tmp_path / "absent"))
    with caplog.at_level("WARNING", logger="server.shared_memory"):
        assert input_region(2, 1024) is None
    assert "sent as bytes" in caplog.text and "does not exist" in caplog.text
