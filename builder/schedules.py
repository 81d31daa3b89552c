"""Learning-rate schedules, stepped once per optimizer step (not per micro-batch).

cosine: linear warmup, then cosine decay to 0 (the default).
step: linear warmup, then `lr * gamma ** (epoch // step_size)`.
onecycle: torch's OneCycleLR (warmup to `lr` over the warmup fraction, then cosine annealing far below
the start); its warmup is `warmup_epochs / epochs` of the run, or torch's 30% when warmup_epochs is 0.
"""

from __future__ import annotations

import math

import torch

from .errors import BuilderError
from .train_config import SCHEDULES


def warmup_factor(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from ~0 to 1 over warmup, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_step(step: int, *, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float) -> float:
    """Learning-rate multiplier: linear warmup, then `gamma ** (epoch // step_size)`."""
    epoch = step // max(1, steps_per_epoch)
    return warmup_factor(step, warmup_steps) * gamma ** (epoch // step_size)


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler for `epochs * steps_per_epoch` optimizer steps."""
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    if name == "cosine":
        warmup_steps = max(1, warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup_steps, total_steps=total_steps)
        )
    if name == "step":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: warmup_step(
                s, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch, step_size=step_size, gamma=gamma
            ),
        )
    if name == "onecycle":
        pct_start = min(0.9, warmup_steps / total_steps) if warmup_steps else 0.3
        # One peak per parameter group (a pretrained backbone's is lower than its classifier's); `lr` is the first.
        peaks = [lr * group["lr"] / optimizer.param_groups[0]["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=max(pct_start, 1.0 / total_steps)
        )
    raise BuilderError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
