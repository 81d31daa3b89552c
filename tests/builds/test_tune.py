"""`builder tune`: an Optuna study that resumes from its folder and hands its best parameters to train."""

import json

import optuna
import pytest

from builder.cli import _train_config, build_parser
from builder.train_config import TrainConfig
from builder.tune import GRID, TuneConfig, tune


def base(tmp_path):
    return TrainConfig(dataset="digits", image_size=8, epochs=1, out_dir=tmp_path)


@pytest.mark.slow
def test_tune_resumes_its_study_and_writes_best_params_usable_by_train(tmp_path, small_digits):
    out = tmp_path / "study"
    first = tune(base(tmp_path), TuneConfig(trials=2, out_dir=out, sampler="random"), small_digits)
    assert first.trials == 2
    again = tune(base(tmp_path), TuneConfig(trials=1, out_dir=out, sampler="random"), small_digits)
    assert again.trials == 3 and again.study_name == first.study_name
    study = optuna.load_study(study_name=again.study_name, storage=again.storage)
    assert len(study.trials) == 3
    best = json.loads((out / "best.json").read_text())
    assert best["params"] == study.best_trial.params
    assert set(best["params"]) == {"lr", "weight_decay", "batch_size", "augment", "label_smoothing"}
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"

    args = build_parser().parse_args(["train", "--params", str(out / "best.json"), "--lr", "0.123"])
    config = _train_config(args)
    assert config.lr == 0.123  # an explicit flag wins over the file
    for key in ("weight_decay", "batch_size", "augment", "label_smoothing"):
        assert getattr(config, key) == best["params"][key]


@pytest.mark.slow
def test_grid_sampler_draws_from_the_small_explicit_grid(tmp_path, small_digits):
    result = tune(
        TrainConfig(dataset="digits", image_size=8, epochs=1, out_dir=tmp_path),
        TuneConfig(trials=1, out_dir=tmp_path / "grid", sampler="grid"),
        small_digits,
    )
    assert all(result.best_params[key] in values for key, values in GRID.items())
