"""Training curves as a picture: loss, accuracy and learning rate per epoch (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Three panels from `metrics.json` records: train/val loss (log scale), train/val accuracy (and macro
    recall), lr."""
    import matplotlib

    matplotlib.use("Agg")  # build machines have no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    figure, (loss, accuracy, lr) = plt.subplots(1, 3, figsize=(13, 3.6))
    for axes, keys, title in (
        (loss, ("train_loss", "val_loss"), "loss"),
        (accuracy, ("train_accuracy", "val_accuracy", "val_macro_recall"), "accuracy"),
        (lr, ("lr",), "learning rate (last step of epoch)"),
    ):
        for key in keys:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                axes.plot(epochs, values, marker="o", markersize=3, label=key.replace("_", " "))
        if axes is loss:
            # Logarithmic: one spike (a first epoch's val loss in the thousands) flattens a linear axis.
            axes.set_yscale(
                "log" if all(v > 0 for h in history for k in keys if (v := h.get(k)) is not None) else "symlog"
            )
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(keys) > 1:
            axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
