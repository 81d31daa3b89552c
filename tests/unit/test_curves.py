"""curves.png: one loss spike must not flatten the rest of the curve."""

import pytest
from matplotlib.figure import Figure

from builder.curves import plot_curves


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the code under test saves, kept for inspection."""
    figures = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_the_loss_axis_is_logarithmic_so_a_spike_does_not_flatten_it(tmp_path, saved_figures):
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 3640.0 if e == 1 else 1.5 / e,
            "train_accuracy": 0.5,
            "val_accuracy": 0.5,
            "val_macro_recall": 0.5,
            "lr": 1e-3,
        }
        for e in range(1, 6)
    ]
    plot_curves(history, tmp_path / "curves.png")
    loss_axes = next(a for a in saved_figures[-1].axes if a.get_title() == "loss")
    assert loss_axes.get_yscale() == "log"
    low, high = loss_axes.get_ylim()
    assert low < 0.3 and high > 3640  # the small values and the spike both fit
