"""Hyperparameter search over the training recipe with Optuna.

Each trial trains with `builder.train.train` (into `<out>/trial-NNN/`) and reports val accuracy per epoch
to a MedianPruner, which stops trials that fall behind the median of earlier ones at the same epoch.
The study lives in `<out>/study.db` (SQLite) under a name fixed by the folder, so running the same
command again adds trials to the same study. `best.json` holds the best trial's parameters in the form
`builder train --params` reads; `tune.png` shows the optimization history and parameter importances.

`storage` shares one study among workers on many machines, through Optuna's own storages: an RDB URL
(`sqlite:///path.db`, `postgresql://...`, `mysql://...`, opened with SQLAlchemy) or `journal://PATH`, an
append-only journal file on a shared filesystem (optuna.storages.JournalStorage with JournalFileBackend,
which locks the file for each write; `journal:///abs/path.log` for an absolute path). Each worker runs
its own `trials`, numbered by the storage, so none is lost or run twice.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .data import ImageDataset, load_dataset
from .errors import TuneError, error_line
from .train import train
from .train_config import AUGMENT_PRESETS, TrainConfig

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
JOURNAL_SCHEME = "journal://"
SCHEMA_ATTEMPTS = 3
# fANOVA fits a random forest to the completed trials: with a handful, its ranking of the parameters is noise.
MIN_TRIALS_FOR_IMPORTANCE = 10
BATCH_SIZES = (32, 64, 128)
# The `grid` sampler's search space: small on purpose (3 x 2 x 2 = 12 trials at most).
GRID = {
    "lr": [1e-3, 3e-3, 1e-2],
    "weight_decay": [0.05],
    "batch_size": [64],
    "augment": ["none", "light"],
    "label_smoothing": [0.0, 0.1],
}


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 20  # new trials this invocation (added to the study's earlier ones)
    timeout_s: float | None = None  # stop starting new trials after this long
    sampler: str = "tpe"
    seed: int = 0
    out_dir: Path = field(default_factory=lambda: Path("runs/tune"))
    storage: str | None = None  # a study shared among workers (see the module's text); None: <out>/study.db
    study: str | None = None  # its name; None: tune-<out folder name>

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise TuneError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.trials < 1:
            raise TuneError("trials must be at least 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise TuneError("timeout must be positive (seconds)")


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    storage: str
    trials: int  # in the study, all invocations together
    completed: int
    pruned: int
    best_value: float
    best_params: dict
    best_json: Path
    plot: Path


def suggest(trial) -> dict:
    """The search space: lr and weight decay (log scale), batch size, augmentation preset, label smoothing."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        "augment": trial.suggest_categorical("augment", list(AUGMENT_PRESETS)),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
    }


def _sampler(name: str, seed: int | None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(GRID, seed=seed)


def storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def _shown(url: str) -> str:
    """`url` without its password, for messages."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def open_storage(url: str):
    """The Optuna storage `url` names, reached now: a URL that cannot be used fails here, before any file
    of the run is written. `journal://PATH` is a journal file (its folder must exist), anything else an RDB URL."""
    import optuna

    if url.startswith(JOURNAL_SCHEME):
        path = Path(url[len(JOURNAL_SCHEME) :])
        if not path.name:
            raise TuneError(f"storage {url}: give the journal file, e.g. journal:///shared/tune/study.log")
        if not path.parent.is_dir():
            raise TuneError(f"storage {url}: folder {path.parent} does not exist (the journal file is made in it)")
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise TuneError(f"storage {url}: cannot use {path}: {e.strerror or e}") from e
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # SQLAlchemy's and the database drivers' errors share no base class worth naming
            # Workers starting together on a new database race to create its tables: the losers' insert
            # of the schema version fails, and the tables are there when they try again.
            if type(e).__name__ == "IntegrityError" and attempt + 1 < SCHEMA_ATTEMPTS:
                log.info("storage %s: tables created by another worker meanwhile; opening again", _shown(url))
                continue
            raise TuneError(f"storage {_shown(url)} cannot be opened: {error_line(e)}") from e
    raise AssertionError("unreachable")


def study_name(config: TuneConfig) -> str:
    return config.study or f"tune-{Path(config.out_dir).resolve().name}"


def create_study(config: TuneConfig):
    """The study, created or reopened (`load_if_exists`): in the run folder's file, or in `config.storage`.

    Workers sharing a storage draw with seeds of their own (the same seed would have them all suggest the
    same parameters)."""
    import optuna

    storage = open_storage(config.storage) if config.storage else storage_url(Path(config.out_dir))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=study_name(config),
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=_sampler(config.sampler, None if config.storage else config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )


def _objective(base: TrainConfig, out: Path, dataset: ImageDataset):
    import optuna

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial)
        config = replace(base, **params, out_dir=out / f"trial-{trial.number:03d}", resume=False, tensorboard=False)

        def report(record: dict) -> None:
            trial.report(record["val_accuracy"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {record['val_accuracy']:.4f} at epoch {record['epoch']}")

        return train(config, dataset, on_epoch=report).val_accuracy

    return objective


def tune(base: TrainConfig, config: TuneConfig, dataset: ImageDataset | None = None) -> TuneResult:
    """Run `config.trials` more trials of `base` with sampled hyperparameters; write best.json and tune.png."""
    import optuna

    out = Path(config.out_dir)
    study = create_study(config)  # first: a storage that cannot be reached fails before anything is written
    dataset = dataset or load_dataset(base.dataset, val_fraction=base.val_fraction, seed=base.seed)
    (out / "config.json").write_text(
        json.dumps(
            {
                "base": base.to_dict(),
                "trials": config.trials,
                "timeout_s": config.timeout_s,
                "sampler": config.sampler,
                "seed": config.seed,
                "study": study.study_name,
                "storage": _shown(config.storage) if config.storage else storage_url(out),
            },
            indent=2,
        )
    )
    study.optimize(_objective(base, out, dataset), n_trials=config.trials, timeout=config.timeout_s, catch=())
    states = [t.state for t in study.trials]
    completed = states.count(optuna.trial.TrialState.COMPLETE)
    if not completed:
        raise TuneError(f"no trial of study {study.study_name} completed (all pruned or failed); run more trials")
    best = study.best_trial
    best_json = out / "best.json"
    best_json.write_text(
        json.dumps(
            {
                "params": best.params,
                "val_accuracy": best.value,
                "trial": best.number,
                "study": study.study_name,
                "base": base.to_dict(),
            },
            indent=2,
        )
    )
    plot = plot_study(study, out / "tune.png")
    return TuneResult(
        study.study_name,
        config.storage or storage_url(out),
        len(study.trials),
        completed,
        states.count(optuna.trial.TrialState.PRUNED),
        best.value,
        dict(best.params),
        best_json,
        plot,
    )


def plot_study(study, path: Path) -> Path:
    """Optimization history (each completed trial, best so far) and parameter importances (fANOVA), the
    latter only from MIN_TRIALS_FOR_IMPORTANCE completed trials on; below that the panel says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.ticker import MaxNLocator

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    figure, (history, importance) = plt.subplots(1, 2, figsize=(11, 3.8))
    numbers, values = [t.number for t in complete], [t.value for t in complete]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    history.scatter(numbers, values, s=18, label="trial")
    history.step(numbers, best_so_far, where="post", color="C1", label="best so far")
    history.set_xlabel("trial")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are whole
    history.set_ylabel("val accuracy")
    history.set_title("optimization history")
    history.legend(fontsize=8)
    history.grid(alpha=0.3)
    importance.set_title("parameter importance")
    importances = _importances(study, len(complete))
    if importances:
        names = list(importances)[::-1]
        importance.barh(names, [importances[n] for n in names])
        importance.set_xlabel("importance (fANOVA)")
    else:
        why = (
            f"not shown: importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials,\n"
            f"this study has {len(complete)} completed trial{'s' if len(complete) != 1 else ''}"
            if len(complete) < MIN_TRIALS_FOR_IMPORTANCE
            else "not shown: the completed trials' parameters\ndo not vary enough to rank them"
        )
        importance.text(0.5, 0.5, why, ha="center", va="center", transform=importance.transAxes)
        importance.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def _importances(study, completed: int) -> dict[str, float]:
    if completed < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. every trial had the same parameters
        log.info("parameter importances unavailable: %s", e)
        return {}
