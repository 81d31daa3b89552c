"""`builder tune`: an Optuna study that resumes from its folder and hands its best parameters to train."""

import json

import optuna
import pytest

from builder.cli import _train_config, build_parser
from builder.train_config import TrainConfig
from builder.tune import GRID, TuneConfig, TuneError, plot_study, tune


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
    result = tune(TrainConfig(dataset="digits", image_size=8, epochs=1, out_dir=tmp_path),
                  TuneConfig(trials=1, out_dir=tmp_path / "grid", sampler="grid"), small_digits)
    assert all(result.best_params[key] in values for key, values in GRID.items())


def test_the_plot_handles_a_single_completed_trial(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.01}, value=0.5,
                                              distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1)}))
    assert plot_study(study, tmp_path / "tune.png").is_file()


def test_unknown_sampler_is_refused():
    with pytest.raises(TuneError, match="tpe, random, grid"):
        TuneConfig(sampler="cmaes")


def _study_with(completed: int):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
                     "label_smoothing": optuna.distributions.FloatDistribution(0, 0.2)}
    for number in range(completed):
        lr, smoothing = 10 ** (-1 - 3 * number / max(completed, 2)), 0.02 * (number % 5)
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "label_smoothing": smoothing},
                                                  value=0.5 + 0.4 * lr, distributions=distributions))
    return study


@pytest.fixture
def saved_figures(monkeypatch):
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_the_history_has_whole_trial_numbers_and_few_trials_get_no_importances(tmp_path, saved_figures):
    plot_study(_study_with(3), tmp_path / "tune.png")
    history, importance = saved_figures[-1].axes
    ticks = [t for t in history.get_xticks() if history.get_xlim()[0] <= t <= history.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert not importance.patches  # no bars from 3 trials
    message = " ".join(t.get_text() for t in importance.texts)
    assert "3 completed trials" in message and "at least" in message, message


def test_importances_are_shown_once_enough_trials_completed(tmp_path, saved_figures):
    from builder.tune import MIN_TRIALS_FOR_IMPORTANCE

    plot_study(_study_with(MIN_TRIALS_FOR_IMPORTANCE), tmp_path / "tune.png")
    importance = saved_figures[-1].axes[1]
    assert len(importance.patches) == 2
