"""The training settings: their checks and the tuned-parameters file."""

import json

import pytest

from builder.train_config import TrainConfig, TrainError, load_params


def test_params_file_is_validated(tmp_path):
    good = tmp_path / "best.json"
    good.write_text(json.dumps({"params": {"lr": 0.01, "augment": "none"}}))
    assert load_params(good) == {"lr": 0.01, "augment": "none"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(TrainError, match="unknown setting.*learning_rate"):
        load_params(bad)
    with pytest.raises(TrainError, match="cannot be read"):
        load_params(tmp_path / "none.json")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"augment": "medium"}, "augment 'medium' is not one of none, light, strong"),
        ({"dropout": 1.5}, "dropout"),
        ({"accum_steps": 0}, "accum_steps"),
        ({"schedule": "linear"}, "schedule"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)
