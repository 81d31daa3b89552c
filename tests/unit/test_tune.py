"""Tuning: its settings and the study's plot, on studies made by hand."""

import optuna
import pytest

from builder.tune import TuneConfig, TuneError, plot_study


def test_the_plot_handles_a_single_completed_trial(tmp_path):
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01}, value=0.5, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1)}
        )
    )
    assert plot_study(study, tmp_path / "tune.png").is_file()


def test_unknown_sampler_is_refused():
    with pytest.raises(TuneError, match="tpe, random, grid"):
        TuneConfig(sampler="cmaes")


def _study_with(completed: int):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1, log=True),
        "label_smoothing": optuna.distributions.FloatDistribution(0, 0.2),
    }
    for number in range(completed):
        lr, smoothing = 10 ** (-1 - 3 * number / max(completed, 2)), 0.02 * (number % 5)
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr, "label_smoothing": smoothing}, value=0.5 + 0.4 * lr, distributions=distributions
            )
        )
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


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql://tuner:hunter2@127.0.0.1:1/studies", "storage postgresql://tuner:***@127.0.0.1:1/studies"),
        ("sqlite:////no/such/folder/study.db", "unable to open database file"),
        ("journal:///no/such/folder/study.log", "folder /no/such/folder does not exist"),
        ("nosuchdatabase://host/db", "cannot be opened"),
    ],
)
def test_a_storage_that_cannot_be_used_is_one_line_and_writes_nothing(capsys, tmp_path, url, message):
    from builder.cli import main

    out = tmp_path / "study"
    assert main(["tune", "--dataset", "digits", "--storage", url, "--out", str(out), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("builder tune: error: storage "), err
    assert message in err and "hunter2" not in err
    assert not out.exists()


@pytest.mark.parametrize("url", ["", "  "])
def test_an_empty_storage_url_is_refused_not_taken_for_the_local_default(capsys, tmp_path, url):
    from builder.cli import main

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as refused:
        main(["tune", "--dataset", "digits", "--storage", url, "--out", str(out), "--trials", "1"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--storage: an empty URL names no storage" in err
    assert not out.exists()


def test_a_journal_file_holds_a_study_that_every_worker_reopens(tmp_path):
    from builder.tune import create_study

    log = tmp_path / "shared" / "study.log"
    log.parent.mkdir()
    url = f"journal://{log}"
    first = create_study(TuneConfig(storage=url, study="shared", out_dir=tmp_path / "a"))
    first.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01}, value=0.5, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1)}
        )
    )
    second = create_study(TuneConfig(storage=url, study="shared", out_dir=tmp_path / "b"))
    assert log.is_file() and [t.value for t in second.trials] == [0.5]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_workers_on_one_storage_do_not_draw_the_same_parameters(tmp_path, sampler):
    # Two workers started with the same --seed: seeded alike they would suggest the same trials.
    from builder.tune import create_study, suggest

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [create_study(TuneConfig(storage=url, study="s", sampler=sampler, out_dir=tmp_path / w)) for w in "ab"]
    drawn = [suggest(worker.ask()) for worker in workers]
    assert drawn[0] != drawn[1]
