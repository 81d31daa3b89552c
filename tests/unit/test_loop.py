"""The shared fine-tune loop's device: the one it is given, else the GPU when there is one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from builder import loop


class _Stop(Exception):
    pass


class _DeviceProbe(nn.Module):
    """Records where its weights and its input are at the first forward pass, then stops the run."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.linear.weight.device.type, x.device.type))
        raise _Stop


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4)), batch_size=4)


def test_finetune_trains_on_the_device_it_is_given():
    probe = _DeviceProbe()
    with pytest.raises(_Stop):
        loop.finetune(probe, _loader(), epochs=1, lr=1e-3, weight_decay=0.0, device="meta", amp=False)
    assert probe.seen == [("meta", "meta")]


def test_finetune_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.default_device() == "cpu"
