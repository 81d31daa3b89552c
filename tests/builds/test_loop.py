"""The shared fine-tune loop over real steps: prune and QAT fine-tune through it on the run's device, and it
hands back the model in eval mode with its history."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from builder import loop
from builder.checkpoint import ModelMeta
from builder.models import create_model
from tests.checkpoints import OLD_META


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.tensor([0, 1] * 4)), batch_size=4)


@pytest.mark.parametrize("stage", ["prune", "qat"])
def test_prune_and_qat_fine_tune_through_the_shared_loop_on_the_runs_device(stage, small_digits, monkeypatch):
    """No device is pinned by the stages: loop.finetune picks the run's (the GPU when there is one)."""
    import importlib

    module = importlib.import_module(f"builder.{stage}")
    calls = []
    monkeypatch.setattr(module, "run_finetune", lambda model, loader, **kwargs: calls.append(kwargs) or [])
    meta = ModelMeta.from_dict({**OLD_META, "num_classes": 10, "classes": [str(i) for i in range(10)]})
    model = create_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    if stage == "prune":
        module.finetune(model, meta, module.PruneConfig(finetune_epochs=0.5), small_digits)
    else:
        module.finetune(module.prepare(model, meta), meta, module.QATConfig(epochs=0.5), small_digits)
    assert len(calls) == 1 and calls[0].get("device") is None


def test_finetune_on_the_cpu_returns_the_model_in_eval_mode_with_its_history():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    history = loop.finetune(model, _loader(), epochs=1.5, lr=1e-2, weight_decay=0.0)
    assert [h["step"] for h in history] == [2, 3] and not model.training
    assert next(model.parameters()).device.type == "cpu"
