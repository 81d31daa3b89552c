"""Input tensors through system shared memory, when the gateway and Triton share a host.

Sent over gRPC, one 224x224 float image (588 KiB) is copied on each step of its way: numpy to bytes,
into the protobuf message, into gRPC's buffers, through the socket, and out again in Triton. With a
region of /dev/shm registered with Triton, the preprocessing thread writes the tensor where Triton
reads it, and the request carries only the region's name and an offset.

The region is cut into equal slots. A request holds one slot from before preprocessing until
Triton has answered; when none is free, or the batch does not fit, the request sends bytes as usual.
Slots are handed out oldest-freed first. Triton only reads a slot, so a call abandoned after a
timeout that Triton still runs later can only read another request's pixels into its own discarded
answer; models with Triton's response cache on get bytes, since that answer would be cached.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

log = logging.getLogger(__name__)
SHM_DIRECTORY = "/dev/shm"
REGION_PREFIX = "gateway-"


def region_exists(key: str) -> bool:
    """Whether a region's key (as registered with Triton, "/name") still names a file in /dev/shm."""
    name = key.lstrip("/")
    return bool(name) and "/" not in name and os.path.exists(os.path.join(SHM_DIRECTORY, name))


class SharedMemoryUnavailable(RuntimeError):
    """The region cannot be made on this host (no /dev/shm, or not enough room in it)."""


@dataclass(frozen=True)
class Slot:
    offset: int  # bytes from the start of the region


class InputRegion:
    """One /dev/shm region of `slots` slots of `slot_bytes` each, named uniquely for this process."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if slots <= 0 or slot_bytes <= 0:
            raise ValueError(f"need slots > 0 and slot_bytes > 0, got {slots} and {slot_bytes}")
        # Aligned slots keep every float tensor aligned for the backends that read it.
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.size = slots * self.slot_bytes
        # Unique per process and start: a Triton that can register this key sees this very region. The
        # process group leads: a supervisor's worker processes share it, so whoever started the gateway can
        # remove what any of them left (stack/launcher.py); the pid keeps two workers' names apart.
        self.name = f"{REGION_PREFIX}{os.getpgrp()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.key = f"/{self.name}"
        if not os.path.isdir(SHM_DIRECTORY):
            raise SharedMemoryUnavailable(f"{SHM_DIRECTORY} does not exist on this host")
        try:
            # SharedMemory names the region and has it unlinked even if this process is killed.
            self._memory = SharedMemory(self.name, create=True, size=self.size)
        except OSError as e:
            raise SharedMemoryUnavailable(f"cannot make a region in {SHM_DIRECTORY}: {e}") from e
        self._memory.close()  # its own mapping: the arrays go over the one below
        try:
            fd = os.open(os.path.join(SHM_DIRECTORY, self.name), os.O_RDWR)
            try:
                # Reserve every page now: on a full tmpfs a write to a lazily allocated page would kill
                # the process with SIGBUS; here it is a clean refusal at start.
                os.posix_fallocate(fd, 0, self.size)
                self._mapping = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        except OSError as e:
            self._memory.unlink()
            raise SharedMemoryUnavailable(f"cannot reserve {self.size} bytes in {SHM_DIRECTORY}: {e}") from e
        # frombuffer holds a buffer export on the mapping: close() cannot unmap it while an array over it
        # lives, so no array ever points at unmapped memory.
        self.view: np.ndarray | None = np.frombuffer(self._mapping, np.uint8)
        # A preprocessing thread may free a slot (see routes).
        self._free: deque[Slot] = deque(Slot(i * self.slot_bytes) for i in range(slots))
        # Told the free slots after each change (a gauge in multiprocess mode cannot ask for them); the lock
        # keeps the values told in the order of the changes.
        self.on_change: Callable[[int], None] | None = None
        self._changing = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self, shape: tuple[int, ...], dtype: np.dtype | type) -> tuple[Slot, np.ndarray] | None:
        """A free slot and a C-contiguous array of `shape` at its start, to be written in place; None
        when the array does not fit a slot or every slot is in use."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > self.slot_bytes or self.view is None:
            return None
        with self._changing:
            try:
                slot = self._free.popleft()
            except IndexError:
                return None
            self._changed()
        return slot, self.view[slot.offset : slot.offset + nbytes].view(dtype).reshape(shape)

    def release(self, slot: Slot) -> None:
        with self._changing:
            self._free.append(slot)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._free))

    def close(self) -> None:
        """Unlink the region and unmap it (Triton keeps its own mapping until it unregisters it)."""
        if self.view is None:
            return
        self.view = None
        try:
            self._memory.unlink()
        except FileNotFoundError:  # someone removed the name already
            resource_tracker.unregister(self.key, "shared_memory")
        try:
            self._mapping.close()
        except BufferError:
            pass  # an array over the region is still alive: the mapping stays until it is collected


def input_region(slots: int, slot_bytes: int) -> InputRegion | None:
    """The region, or None (logged) when this host cannot make it; the gateway then sends bytes."""
    if slots <= 0:
        return None
    try:
        region = InputRegion(slots, slot_bytes)
    except SharedMemoryUnavailable as e:
        log.warning("input tensors will be sent as bytes: %s", e)
        return None
    log.info(
        "input tensors can go through shared memory %s: %d slots of %d bytes", region.name, slots, region.slot_bytes
    )
    return region
