"""builder.distributed without a process group: what each rank's share of an epoch is, and what a run
started outside a launcher does (nothing)."""

import pytest
import torch.distributed as dist

from builder import distributed
from builder.errors import TrainError


def _group(rank: int, world_size: int = 2) -> distributed.Group:
    return distributed.Group(rank=rank, world_size=world_size, backend="gloo")


def test_outside_a_launcher_a_run_is_one_plain_process(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group() as group:
        assert group == distributed.ALONE and group.is_main and group.device == "cpu"
        assert not dist.is_initialized()


def test_the_ranks_shares_together_are_one_epoch_and_each_epoch_reshuffles():
    data = list(range(12))
    samplers = [distributed.train_sampler(data, _group(rank), seed=0) for rank in (0, 1)]
    orders = []
    for epoch in (1, 2):
        shares = []
        for sampler in samplers:
            distributed.set_epoch(sampler, epoch)
            shares.append(list(sampler))
        # Batch k of every rank, together: batch k of one process at twice the batch size.
        whole = [index for pair in zip(*shares, strict=True) for index in pair]
        assert sorted(whole) == data
        orders.append(whole)
    assert orders[0] != orders[1]
    assert distributed.train_sampler(data, distributed.ALONE, seed=0) is None


def test_evaluation_shards_cover_the_set_once_without_padding():
    data = list(range(5))
    shards = [list(distributed.shard(data, _group(rank))) for rank in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert distributed.shard(data, distributed.ALONE) is data


def test_a_bad_timeout_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(TrainError, match="positive number of seconds"):
        distributed.timeout_s()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "30")
    assert distributed.timeout_s() == 30.0


def test_only_a_failed_collective_reads_as_a_peer_failure():
    lost = dist.DistBackendError("[gloo] Connection closed by peer [127.0.0.1]:29500")
    failure = distributed.peer_failure(lost, _group(0))
    assert failure is not None and "another of the 2 processes" in str(failure) and "rank 0" in str(failure)
    assert distributed.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), _group(0)) is None
    assert distributed.peer_failure(lost, distributed.ALONE) is None
