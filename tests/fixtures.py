"""Session fixtures that train: shared by the tiers that need a trained model (tests/builds, tests/functional),
whose conftests import them. The unit tier never does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """ResNet-18 on digits at 8x8 for two epochs (a few seconds): best.pt and model.onnx."""
    from builder.export import export_onnx
    from builder.train import train
    from builder.train_config import TrainConfig

    run_dir = tmp_path_factory.mktemp("run")
    result = train(TrainConfig(dataset="digits", epochs=2, image_size=8, out_dir=run_dir))
    export_onnx(result.best_checkpoint, run_dir / "model.onnx", parity_images=16)
    return run_dir


@pytest.fixture(scope="session")
def small_digits():
    """A 200/80-image slice of the digits split: enough to train at 8x8 for an epoch in about a second."""
    from builder.data import Split, load_dataset

    full = load_dataset("digits")
    return dataclasses.replace(
        full,
        train=Split(full.train.images[:200], full.train.labels[:200]),
        val=Split(full.val.images[:80], full.val.labels[:80]),
    )
