"""Training in several processes with torch.distributed: one process per GPU (NCCL), or several CPU processes
(gloo), started by torchrun on one machine or many.

torchrun gives each process it starts RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
(https://pytorch.org/docs/stable/elastic/run.html#environment-variables). Without them a run is one plain
process and every helper here does nothing.

A collective waits at most BUILDER_DIST_TIMEOUT seconds (default DEFAULT_TIMEOUT_S) for the other processes,
so a process that hangs or vanishes ends the run with an error instead of blocking the rest forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from .errors import BuilderError, TrainError, error_line

TIMEOUT_ENV = "BUILDER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """Where this process stands: its rank among `world_size` processes, and the backend (None: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints results."""
        return self.rank == 0

    @property
    def device(self) -> str:
        """The device this process trains on: its own GPU under NCCL, else the CPU."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


ALONE = Group()


def launched() -> bool:
    """Whether a launcher such as torchrun started this process as one of a group."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def environment_rank() -> int:
    """This process's rank as the launcher gave it (0 outside a launcher), before any group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _integer_variable(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text or "")
    except ValueError:
        raise TrainError(f"environment variable {name}={text!r} is not a whole number (set by torchrun)") from None


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise TrainError(f"{TIMEOUT_ENV}={text!r}: give the process-group timeout as a positive number of seconds")
    return value


def current() -> Group:
    """The group this process belongs to now (ALONE when none is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ALONE
    return Group(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_integer_variable("LOCAL_RANK", "0"),
        backend=str(dist.get_backend()),
    )


@contextlib.contextmanager
def process_group() -> Iterator[Group]:
    """Join the launcher's process group for the duration (NCCL on GPUs, each process on cuda:LOCAL_RANK;
    gloo on CPUs) and leave it afterwards. Yields ALONE outside a launcher, and the existing group when
    the caller already joined one (which then stays the caller's to leave)."""
    if not launched():
        yield ALONE
        return
    if dist.is_initialized():
        yield current()
        return
    rank, world_size = _integer_variable("RANK"), _integer_variable("WORLD_SIZE")
    local_rank = _integer_variable("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): start at most "
                "one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s())
        )
    except (RuntimeError, ValueError) as e:  # rendezvous timeout, unreachable MASTER_ADDR, bad port
        raise TrainError(f"cannot join the training processes ({backend}, rank {rank}): {error_line(e)}") from e
    clean = False
    try:
        yield current()
        clean = True
    except BuilderError:
        clean = True  # every process raised it (same input, same check): leaving together is safe
        raise
    finally:
        # After a peer failed, leaving would wait on that peer; the process exits instead.
        if clean:
            dist.destroy_process_group()


def peer_failure(error: BaseException, group: Group) -> TrainError | None:
    """A clear error for a collective that failed because another process died, hung or became unreachable
    (None for any other error)."""
    if not group.active:
        return None
    distributed_error = getattr(dist, "DistError", ())
    text = str(error)
    signs = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")
    if not isinstance(error, distributed_error) and not any(sign in text.lower() for sign in signs):
        return None
    return TrainError(
        f"training stopped: another of the {group.world_size} processes failed or stopped answering "
        f"(this is rank {group.rank}; {group.backend}): {error_line(error)}"
    )


def wrap(model: nn.Module, group: Group) -> nn.Module:
    """The module that trains: `model` itself alone, else DistributedDataParallel around it (which copies rank
    0's weights and buffers to every process, then averages gradients across them in each backward)."""
    if not group.active:
        return model
    return DistributedDataParallel(model, device_ids=[group.local_rank] if group.backend == "nccl" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (whose state dict, without the `module.` prefix, is what
    checkpoints hold), or `model` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of a backward pass whose gradients are accumulated, not yet stepped."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def train_sampler(dataset: Dataset, group: Group, *, seed: int) -> DistributedSampler | None:
    """Each process's share of a shuffled epoch (the same permutation everywhere, drawn from `seed` and the
    epoch set with `set_epoch`), or None alone. Process r takes every world_size-th index from r, so the
    processes' batches k together are batch k of one process with world_size times the batch size."""
    if not group.active:
        return None
    return DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank, shuffle=True, seed=seed)


def set_epoch(sampler: object, epoch: int) -> None:
    """Reshuffle a distributed sampler for `epoch` (otherwise every epoch repeats the first one's order)."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def shard(dataset: Dataset, group: Group) -> Dataset:
    """This process's share of an evaluation set, without the padding DistributedSampler adds: the shards'
    sums add up to exactly the whole set's."""
    if not group.active:
        return dataset
    return Subset(dataset, range(group.rank, len(dataset), group.world_size))  # type: ignore[arg-type]


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """`values` added up over every process of the group (unchanged alone); float64 keeps counts exact."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    group = current()
    total = values.detach().to(device=group.device, dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def broadcast_buffers(model: nn.Module, group: Group) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), so all of them evaluate the saved model."""
    if not group.active:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def gather(value: T, group: Group) -> list[T]:
    """Every process's `value`, in rank order (`[value]` alone)."""
    if not group.active:
        return [value]
    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values


def from_main(read: Callable[[], T], group: Group) -> T:
    """`read()` on rank 0, its result sent to every process: files need to exist on rank 0's machine only.
    A BuilderError it raises is raised on every process, so none of them waits for a result that never comes."""
    if not group.active:
        return read()
    box: list[Any] = [None]
    failure: BuilderError | None = None
    if group.is_main:
        try:
            box[0] = ("ok", read())
        except BuilderError as e:
            failure = e
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise TrainError(value)
    return value


def describe(group: Group) -> dict:
    """The group as a run's recipe records it."""
    return {"world_size": group.world_size, "backend": group.backend}
