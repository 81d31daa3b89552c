"""Logits -> the top-k classes per image, as the gateway and the local gRPC client both answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Softmax over classes, then the k most probable per image, most probable first."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        {
            "predictions": [
                {"label": labels[i] if i < len(labels) else str(i), "index": int(i), "score": float(row[i])}
                for i in indices
            ]
        }
        for row, indices in zip(probabilities, best)
    ]
