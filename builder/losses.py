"""Classification losses: cross-entropy or focal, with class weights and label smoothing.

Both take integer class targets or probability targets (rows summing to 1, as CutMix and MixUp
produce), so the same criterion serves every augmentation preset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LossError
from .train_config import LOSSES


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """1 / class frequency, normalized to mean 1 (a class absent from training gets the largest weight)."""
    counts_t = torch.as_tensor(counts, dtype=torch.float64)
    if counts_t.numel() == 0 or counts_t.max() <= 0:
        raise LossError("cannot derive class weights: the training split is empty")
    inverse = 1.0 / counts_t.clamp(min=1.0)
    return (inverse / inverse.mean()).float()


def resolve_class_weights(setting: str, counts: Sequence[int]) -> torch.Tensor | None:
    """`none` -> None, `auto` -> inverse training frequencies, `w1,w2,...` -> those (one per class, > 0)."""
    text = (setting or "none").strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return inverse_frequency_weights(counts)
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise LossError(f"--class-weights {setting!r} is not none, auto or comma-separated numbers") from None
    if len(weights) != len(counts):
        raise LossError(f"--class-weights has {len(weights)} value(s) but the dataset has {len(counts)} classes")
    if any(not w > 0 for w in weights):
        raise LossError("--class-weights values must be positive")
    return torch.tensor(weights, dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p)^gamma per class term.

    gamma=0 is exactly `F.cross_entropy` with the same weight and label smoothing, for class-index and
    probability targets alike (class-index targets with weights are averaged over the targets' weights,
    as torch does).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    hard = not target.is_floating_point()
    probabilities = F.one_hot(target, logits.shape[1]).float() if hard else target.float()
    if label_smoothing:
        probabilities = probabilities * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    terms = -probabilities * log_p
    if gamma:
        terms = terms * (1.0 - log_p.exp()).clamp(min=0.0) ** gamma
    if weight is not None:
        terms = terms * weight.to(terms)
    per_sample = terms.sum(dim=1)
    if hard and weight is not None:
        return per_sample.sum() / weight.to(terms)[target].sum()
    return per_sample.mean()


class FocalLoss(nn.Module):
    weight: torch.Tensor | None  # a buffer: it follows the module to its device

    def __init__(self, *, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, gamma=self.gamma, weight=self.weight, label_smoothing=self.label_smoothing)


def create_loss(
    name: str, *, weight: torch.Tensor | None = None, label_smoothing: float = 0.0, focal_gamma: float = 2.0
) -> nn.Module:
    """`ce` (torch's cross-entropy, which takes probability targets too) or `focal`."""
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma=focal_gamma, weight=weight, label_smoothing=label_smoothing)
    raise LossError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
