"""Training: AdamW with linear warmup and cosine decay, light augmentation, best checkpoint by val accuracy."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from server.preprocess import PreprocessSpec, normalize, preprocess, to_model_pixels

from .data import ImageDataset, TorchSplit, load_dataset, resolve_spec
from .errors import CheckpointError
from .models import create_model
from .progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    dataset: str = "digits"
    arch: str = "resnet18"
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    image_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("runs/latest"))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    val_accuracy: float
    epochs: int
    seconds: float


def eval_transform(spec: PreprocessSpec):
    """The exact transform the gateway applies, as a torch tensor."""
    return lambda image: torch.from_numpy(preprocess(image, spec))


def train_transform(spec: PreprocessSpec):
    """Small geometric jitter on the model-sized image, then the same normalization as eval."""
    jitter = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))

    def transform(image: Image.Image) -> torch.Tensor:
        pixels = jitter(to_model_pixels(image, spec))
        return torch.from_numpy(normalize(np.asarray(pixels), spec))

    return transform


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from ~0 to 1 over warmup, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(dim=1) == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


def _save(payload: dict, path: Path) -> None:
    # Written beside and renamed, so a crash never leaves a half-written checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, dataset: ImageDataset | None = None) -> TrainResult:
    """Train a classifier and write `best.pt`, `last.pt`, `metrics.json` and `config.json` to `out_dir`."""
    seed_everything(config.seed)
    dataset = dataset or load_dataset(config.dataset, val_fraction=config.val_fraction, seed=config.seed)
    spec = resolve_spec(dataset, image_size=config.image_size)
    model = create_model(
        config.arch, num_classes=len(dataset.classes), in_channels=spec.channels, image_size=spec.image_size
    )
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        TorchSplit(dataset.train, dataset.color_mode, train_transform(spec)),
        batch_size=config.batch_size, shuffle=True, generator=generator,
    )
    val_loader = DataLoader(
        TorchSplit(dataset.val, dataset.color_mode, eval_transform(spec)), batch_size=2 * config.batch_size
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)
    warmup_steps = max(1, int(config.warmup_epochs * len(train_loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    meta = {
        "arch": config.arch,
        "num_classes": len(dataset.classes),
        "in_channels": spec.channels,
        "image_size": spec.image_size,
        "classes": dataset.classes,
        "preprocess": spec.to_dict(),
        "config": config.to_dict(),
    }

    history, best_accuracy, start = [], -1.0, time.monotonic()
    for epoch in range(1, config.epochs + 1):
        model.train()
        running_loss = seen = 0
        with progress_bar(f"epoch {epoch}/{config.epochs}", total=len(train_loader)) as advance:
            for images, labels in train_loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running_loss += loss.item() * labels.numel()
                seen += labels.numel()
                advance(f"loss {running_loss / seen:.4f}")
        val_accuracy = evaluate_accuracy(model, val_loader)
        history.append(
            {"epoch": epoch, "train_loss": running_loss / seen, "val_accuracy": val_accuracy,
             "lr": scheduler.get_last_lr()[0]}
        )
        log.info("epoch %d: train loss %.4f, val accuracy %.4f", epoch, running_loss / seen, val_accuracy)
        checkpoint = {"model": model.state_dict(), "meta": {**meta, "epoch": epoch, "val_accuracy": val_accuracy}}
        _save(checkpoint, run_dir / "last.pt")
        if val_accuracy > best_accuracy:
            best_accuracy = val_accuracy
            _save(checkpoint, run_dir / "best.pt")
        (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))

    return TrainResult(run_dir, run_dir / "best.pt", best_accuracy, config.epochs, time.monotonic() - start)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = payload["meta"], payload["model"]
        model = create_model(
            meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
            image_size=meta["image_size"],
        )
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a checkpoint written by `builder train`: {e}") from e
    except Exception as e:  # torch raises pickle's and zipfile's own errors for foreign files
        if type(e).__module__.split(".")[0] in ("pickle", "_pickle", "zipfile"):
            raise CheckpointError(f"{path} is not a checkpoint written by `builder train`: {e}") from e
        raise
    model.eval()
    return model, meta
