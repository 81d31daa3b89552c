"""Pruning: its settings, and a file that is not a checkpoint."""

import pytest

from builder.checkpoint import load_model
from builder.errors import CheckpointError
from builder.prune import PruneConfig, PruneError


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"keep_ratio": 1.5}, "between 0 and 1"),
        ({"importance": "l3"}, "l1, l2"),
        ({"scope": "local"}, "global, uniform"),
        ({"target": "flops"}, "macs, params"),
    ],
)
def test_bad_prune_settings_name_the_valid_choices(settings, message):
    with pytest.raises(PruneError, match=message):
        PruneConfig(**settings)


def test_a_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "x.pt").write_text("nope")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "x.pt")
