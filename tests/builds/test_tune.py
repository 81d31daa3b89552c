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


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["journal", "sqlite"])
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(tmp_path, scheme):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from builder.tune import open_storage

    url = f"journal://{tmp_path / 'study.log'}" if scheme == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "builder", "tune", "--dataset", "shapes:per_class=16,size=8", "--image-size"]
    command += ["8", "--epochs", "1", "--batch-size", "16", "--trials", "2", "--sampler", "random"]
    command += ["--storage", url, "--study", "shared"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([*command, "--out", str(tmp_path / name)], env=env, stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]

    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    trials = study.trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # 2 trials asked of each worker
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no parameters drawn twice
    ran = sorted(p.name for name in ("a", "b") for p in (tmp_path / name).glob("trial-*"))
    assert ran == [f"trial-{n:03d}" for n in range(4)]  # each trial trained by exactly one worker
    # Each worker's best.json is the study's best when it finished: the later one holds the study's record.
    best = max((json.loads((tmp_path / n / "best.json").read_text()) for n in "ab"), key=lambda b: b["val_accuracy"])
    assert best["val_accuracy"] == study.best_value
    # Trials this small often tie (chance accuracy); Optuna names the first of them its best trial, a worker
    # that finished before it names the one it saw: any of the tied trials, with its own parameters.
    by_number = {t.number: t for t in trials}
    assert by_number[best["trial"]].value == study.best_value
    assert best["params"] == by_number[best["trial"]].params
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert {r["trials"] for r in results} <= {3, 4} and max(r["trials"] for r in results) == 4
