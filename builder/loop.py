"""The training loop's pieces, shared by training and the fine-tunes of pruning and QAT: seeding,
deterministic kernels, one epoch of training, a fixed-length fine-tune, and evaluation."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .distributed import no_sync, sum_across, unwrap
from .models import backbone_eval
from .progress import progress_bar
from .schedules import warmup_cosine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms while training (warn instead of fail where an op has none), then as before."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def default_device() -> str:
    """Where a run trains: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int | None = None,
    device: str = "cpu",
    advance: Callable[..., None] | None = None,
    *,
    sharded: bool = False,
) -> dict:
    """Validation loss (plain cross-entropy: comparable across loss settings), accuracy and macro recall.
    `advance(steps=n)` is told of every batch of n images. `sharded`: `loader` holds this process's share of
    the set, and the figures are of all the processes' shares together (every process gets them)."""
    model.eval()
    loss_sum = 0.0
    hits: torch.Tensor | None = None
    support: torch.Tensor | None = None
    for images, labels in loader:
        logits = model(images.to(device)).float().cpu()
        classes = num_classes or logits.shape[1]
        if hits is None or support is None:
            hits, support = torch.zeros(classes), torch.zeros(classes)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct = logits.argmax(dim=1) == labels
        hits += torch.bincount(labels[correct], minlength=classes)
        support += torch.bincount(labels, minlength=classes)
        if advance is not None:
            advance(steps=labels.numel())
    if sharded:
        if (hits is None or support is None) and num_classes:  # a share can be empty
            hits, support = torch.zeros(num_classes), torch.zeros(num_classes)
        if hits is not None and support is not None:
            total_sums = sum_across(torch.cat([torch.tensor([loss_sum]), hits, support]))
            loss_sum, hits, support = float(total_sums[0]), *total_sums[1:].float().chunk(2)
    if hits is None or support is None:
        return {"val_loss": 0.0, "val_accuracy": 0.0, "val_macro_recall": 0.0}
    total = max(int(support.sum()), 1)
    present = support > 0
    return {
        "val_loss": loss_sum / total,
        "val_accuracy": float(hits.sum()) / total,
        "val_macro_recall": float((hits[present] / support[present]).mean()) if present.any() else 0.0,
    }


def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: str = "cpu") -> float:
    """Top-1 accuracy of `model` on `loader` (in eval mode)."""
    return evaluate_loader(model, loader, device=device)["val_accuracy"]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    *,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    mixer=None,
    device: str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
    frozen_backbone: bool = False,
    advance: Callable[..., None] | None = None,
) -> dict:
    """One pass over `loader`. Gradients of `accum_steps` micro-batches (each loss divided by their count)
    add up to one optimizer step, and the scheduler steps with the optimizer.

    `model` may be a DistributedDataParallel: `loader` is then this process's share of the epoch, gradients
    are averaged across the processes at each optimizer step, and the loss and accuracy returned are of
    every process's images together."""
    if frozen_backbone:
        model.train()
        backbone_eval(unwrap(model))
    else:
        model.train()
    amp = scaler is not None and scaler.is_enabled()
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    batches, loss_sum, correct, seen = len(loader), 0.0, 0, 0
    last_lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    for index, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)
        stepping = (index + 1) % accum_steps == 0 or index + 1 == batches
        # Processes exchange gradients once per optimizer step, not after every micro-batch.
        with contextlib.nullcontext() if stepping else no_sync(model):
            with torch.autocast("cuda", enabled=amp):
                logits = model(images)
                loss = criterion(logits, targets)
            # The last group of an epoch can be short: divide by its real size so every step averages the same way.
            group = min(accum_steps, batches - (index // accum_steps) * accum_steps)
            scaler.scale(loss / group).backward()
        if stepping:
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            last_lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        count = labels.numel()
        loss_sum += loss.item() * count
        truth = targets.argmax(dim=1) if targets.is_floating_point() else targets
        correct += (logits.argmax(dim=1) == truth).sum().item()
        seen += count
        if advance is not None:
            advance(f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f}", steps=count)
    if unwrap(model) is not model:  # each process saw its share: report the whole epoch's figures
        loss_sum, correct, seen = sum_across(torch.tensor([loss_sum, correct, seen], dtype=torch.float64)).tolist()
    # lr: what the epoch's last optimizer step used.
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1), "lr": last_lr}


def finetune(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: float,
    lr: float,
    weight_decay: float,
    device: str | None = None,
    amp: bool | None = None,
    label: str = "fine-tune",
    before_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """A short AdamW run (warmup, then cosine decay; cross-entropy with label smoothing 0.1) of
    `ceil(epochs * len(loader))` steps on `device` (default: the GPU when there is one), with mixed precision
    there unless `amp` is False. `before_step(step)` runs before each step (QAT freezes statistics with it).

    The model trains where the run trains and comes back to the device it was on, in eval mode. Returns one
    record per pass over the loader (and one for a last partial pass): step, epoch, mean train loss.
    """
    device = device or default_device()
    amp = str(device).startswith("cuda") if amp is None else amp
    home = next(model.parameters()).device
    model.to(device)
    total_steps = max(1, math.ceil(epochs * len(loader)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=max(1, total_steps // 10), total_steps=total_steps)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    done, history, losses = 0, [], []
    with progress_bar(label, total=total_steps) as advance:
        while done < total_steps:
            for images, labels in loader:
                if before_step is not None:
                    before_step(done)
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=amp):
                    loss = criterion(model(images), labels)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                done += 1
                losses.append(loss.item())
                advance(f"loss {loss.item():.4f}")
                if done % len(loader) == 0 or done >= total_steps:
                    history.append({"step": done, "epoch": done / len(loader), "train_loss": float(np.mean(losses))})
                    losses = []
                if done >= total_steps:
                    break
    model.to(home)
    model.eval()
    return history
