"""Training: the recipe (model, data, augmentation, loss, optimizer, schedule) and the loop that runs it.

Its settings are `TrainConfig` (`builder.train_config`).

A run folder (`out_dir`) holds `best.pt` (by val accuracy), `last.pt` (with the state `--resume` needs),
`metrics.json` (one record per epoch), `config.json` (the resolved config), `datacheck.json` and
`curves.png`, and with `tensorboard=True` the event files under `tensorboard/`.

Started by torchrun, a run trains in every process it starts (`builder.distributed`): each process takes its
share of every epoch with `batch_size` images per step, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from server.preprocess import PreprocessSpec

from . import distributed
from .checkpoint import ModelMeta, load_init_weights, read_checkpoint, save_model
from .curves import plot_curves
from .data import ImageDataset, TorchSplit, load_dataset, resolve_spec
from .datacheck import check_once, log_report
from .errors import CheckpointError, TrainError, error_line
from .loop import deterministic, evaluate_loader, seed_everything, train_one_epoch
from .losses import create_loss, resolve_class_weights
from .models import (
    create_model,
    default_dropout,
    fetch_pretrained,
    freeze_backbone,
    load_pretrained,
    parameter_groups,
    pretrained_weights,
    recalibrate_batchnorm,
    set_backbone_trainable,
    weights_cache_file,
    weights_name,
    weights_preprocess,
)
from .progress import console, progress_bar
from .schedules import create_scheduler
from .train_config import OPTIMIZERS, TrainConfig
from .transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

SGD_MOMENTUM = 0.9
# BatchNorm statistics are recomputed after every epoch from this many training images at most.
CALIBRATION_IMAGES = 512


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    val_accuracy: float
    epochs: int  # epochs trained in total (fewer than asked after early stopping)
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    warnings: tuple[str, ...] = ()


def batch_mixer(num_classes: int, *, cutmix: float = 0.0, mixup: float = 0.0):
    """CutMix and/or MixUp on (images, labels) batches (one of them per batch, chosen at random), or None.
    Labels come back as class probabilities."""
    ops = ([v2.CutMix(num_classes=num_classes, alpha=cutmix)] if cutmix > 0 else []) + (
        [v2.MixUp(num_classes=num_classes, alpha=mixup)] if mixup > 0 else []
    )
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


# ---- pieces of the loop ----


def create_optimizer(parameters, name: str, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay, momentum=SGD_MOMENTUM, nesterov=True)
    raise TrainError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


# ---- the run ----


def _device(config: TrainConfig) -> tuple[str, bool]:
    cuda = torch.cuda.is_available()
    if config.amp == "on" and not cuda:
        raise TrainError("--amp on needs a CUDA GPU; none is available (use --amp auto)")
    return ("cuda" if cuda else "cpu"), cuda and config.amp != "off"


def _rng_state(generator: torch.Generator) -> dict:
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
        "python": random.getstate(),
        "numpy": [state[0], state[1].tolist(), *state[2:]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    np.random.set_state((state["numpy"][0], np.asarray(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Run:
    """Everything one training run builds before its first epoch."""

    config: TrainConfig
    dataset: ImageDataset
    spec: PreprocessSpec
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    class_weights: torch.Tensor | None
    mixer: object
    device: str
    meta: ModelMeta
    # None: the running statistics stay as training left them (a frozen backbone keeps its --init ones).
    calibration_loader: DataLoader | None = None
    group: distributed.Group = distributed.ALONE
    trainer: nn.Module | None = None  # what trains: `model`, or DistributedDataParallel around it


def _calibration_loader(dataset: ImageDataset, spec: PreprocessSpec, batch_size: int, seed: int) -> DataLoader:
    """Up to CALIBRATION_IMAGES training images through the eval transform (what validation and the gateway
    feed the model), in mixed-class batches; a short last batch is dropped, since each batch counts equally."""
    count = min(len(dataset.train), CALIBRATION_IMAGES)
    # Its own generator: the same images, in the same batches, every epoch.
    chosen = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    images = Subset(TorchSplit(dataset.train, dataset.color_mode, eval_transform(spec)), chosen)
    return DataLoader(images, batch_size=min(2 * batch_size, count), drop_last=True)


def _spec_settings(config: TrainConfig, dataset: ImageDataset, weights) -> dict:
    """resolve_spec's settings: the flags, and for pretrained weights their own eval preprocessing where the
    flags say nothing (their input size, crop ratio, mean and std, not statistics measured on the data)."""
    settings = {"image_size": config.image_size, "mean": config.mean, "std": config.std, "equalize": config.equalize}
    if weights is not None:
        crop, resize, mean, std = weights_preprocess(weights)
        if dataset.color_mode == "L":  # one channel: the average of the three
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        settings.update(
            image_size=config.image_size or crop,
            crop_fraction=crop / resize,
            mean=config.mean or mean,
            std=config.std or std,
        )
    return settings


def _prepare(config: TrainConfig, dataset: ImageDataset | None, group: distributed.Group = distributed.ALONE) -> _Run:
    device, amp = _device(config)
    device = group.device if group.active else device
    if config.init and not Path(config.init).is_file():
        raise CheckpointError(f"--init checkpoint {config.init} does not exist")
    if config.tensorboard:
        _tensorboard_writer(None)  # fail before the work starts if the package is missing
    # Fetched first: offline and not cached, the run stops here, before anything is written.
    published = pretrained_weights(config.arch, config.pretrained) if config.pretrained else None
    published_state = fetch_pretrained(published) if published is not None else None
    dataset = dataset or load_dataset(config.dataset, val_fraction=config.val_fraction, seed=config.seed)
    spec = resolve_spec(dataset, **_spec_settings(config, dataset, published))
    num_classes = len(dataset.classes)
    train_counts = np.bincount(dataset.train.labels, minlength=num_classes).tolist()
    weights = resolve_class_weights(config.class_weights, train_counts)
    dropout = config.dropout if config.dropout is not None else default_dropout(config.arch)
    model = create_model(
        config.arch, num_classes=num_classes, in_channels=spec.channels, image_size=spec.image_size, dropout=dropout
    )
    init = load_init_weights(model, Path(config.init)).to_dict() if config.init else None
    pretrained = None
    if published is not None and published_state is not None:
        loaded = load_pretrained(model, published, published_state)
        pretrained = {
            "weights": weights_name(published),
            "file": str(weights_cache_file(published)),
            **loaded.to_dict(),
        }
    freeze_epochs, backbone_lr_scale = config.fine_tuning()
    if config.freeze_backbone:
        parameters = freeze_backbone(model)
    elif backbone_lr_scale != 1.0:
        parameters = parameter_groups(model, lr=config.lr, backbone_scale=backbone_lr_scale)
    else:
        parameters = list(model.parameters())
    model.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    # num_workers=0: augmentation draws from the process's torch RNG, which is seeded and checkpointed.
    train_split = TorchSplit(
        dataset.train, dataset.color_mode, train_transform(spec, config.augment, flip=dataset.flip_invariant)
    )
    sampler = distributed.train_sampler(train_split, group, seed=config.seed)
    train_loader = DataLoader(
        train_split,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=0,
    )
    val_loader = DataLoader(
        distributed.shard(TorchSplit(dataset.val, dataset.color_mode, eval_transform(spec)), group),
        batch_size=2 * config.batch_size,
    )
    optimizer = create_optimizer(parameters, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train_loader) // config.accum_steps)
    scheduler = create_scheduler(
        optimizer,
        config.schedule,
        lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=config.warmup_epochs,
        step_size=config.step_size,
        gamma=config.gamma,
    )
    weights = weights.to(device) if weights is not None else None
    # Unweighted here: each epoch sets the class weights it trains with (see `_epochs`).
    criterion = create_loss(config.loss, label_smoothing=config.label_smoothing, focal_gamma=config.focal_gamma)
    cutmix, mixup = config.mixing_alphas()
    calibration = None if config.freeze_backbone else _calibration_loader(dataset, spec, config.batch_size, config.seed)
    meta = ModelMeta(
        arch=config.arch,
        num_classes=num_classes,
        in_channels=spec.channels,
        image_size=spec.image_size,
        classes=tuple(dataset.classes),
        preprocess=spec,
        config=config.to_dict(),
        recipe={
            "dropout": dropout,
            "cutmix": cutmix,
            "mixup": mixup,
            "device": device,
            "amp": amp,
            "class_weights": weights.tolist() if weights is not None else None,
            "steps_per_epoch": steps_per_epoch,
            "train_counts": train_counts,
            "init": init,
            "pretrained_weights": pretrained,
            "freeze_epochs": freeze_epochs,
            "backbone_lr_scale": backbone_lr_scale,
            "batchnorm_calibration_images": len(calibration.dataset) if calibration is not None else 0,
            **({"distributed": distributed.describe(group)} if group.active else {}),
        },
    )
    return _Run(
        config,
        dataset,
        spec,
        model,
        train_loader,
        val_loader,
        generator,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cuda", enabled=amp),
        criterion,
        weights,
        batch_mixer(num_classes, cutmix=cutmix, mixup=mixup),
        device,
        meta,
        calibration,
        group,
        distributed.wrap(model, group),
    )


def _tensorboard_writer(log_dir: Path | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(log_dir)) if log_dir is not None else None


def _restore(run: _Run, path: Path) -> tuple[int, list[dict], float, int]:
    """Load last.pt's model, optimizer, scheduler and RNG state; returns (epoch, history, best acc, best epoch)."""

    def read() -> dict:
        if not path.is_file():
            raise TrainError(f"--resume: {path} does not exist (nothing to resume in {path.parent})")
        return read_checkpoint(path, flag="--resume:")

    # Rank 0 reads the file and hands it to the others: it need not be on every machine.
    payload = distributed.from_main(read, run.group)
    try:
        state = payload["resume"]
        run.model.load_state_dict(payload["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        _set_rng_state(_own_rng_state(state, run.group), run.generator)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise TrainError(
            f"--resume: {path} cannot continue this run (other settings, or not written by "
            f"this builder): {error_line(e)}"
        ) from e
    previous = payload["meta"].get("config", {})
    changed = sorted(k for k in previous if k not in ("resume", "out_dir") and previous[k] != run.meta.config.get(k))
    if changed:
        log.warning("resuming with different settings than the run started with: %s", ", ".join(changed))
    return state["epoch"], list(state["history"]), state["best_accuracy"], state["best_epoch"]


def _own_rng_state(state: dict, group: distributed.Group) -> dict:
    """This process's random state from a resume state: its rank's own when the run had as many processes."""
    by_rank = state.get("rng_by_rank") or [state["rng"]]
    if len(by_rank) == group.world_size:
        return by_rank[group.rank]
    log.warning(
        "resuming with %d processes after %d: augmentation draws differ from an uninterrupted run",
        group.world_size,
        len(by_rank),
    )
    return state["rng"]


def _resume_state(
    run: _Run, epoch: int, history: list[dict], best: tuple[float, int], rng_by_rank: list[dict] | None = None
) -> dict:
    """What --resume needs, in last.pt only (loaders of trained models read "model" and "meta"). `rng_by_rank`:
    every process's random state, when several trained."""
    return {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "history": history,
        "best_accuracy": best[0],
        "best_epoch": best[1],
        "rng": _rng_state(run.generator),
        **({"rng_by_rank": rng_by_rank} if rng_by_rank and len(rng_by_rank) > 1 else {}),
    }


def _write_records(run_dir: Path, history: list[dict]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, run_dir / "curves.png")


def train(
    config: TrainConfig, dataset: ImageDataset | None = None, *, on_epoch: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train a classifier; write best.pt, last.pt, metrics.json, config.json, datacheck.json and curves.png.

    `on_epoch(record)` is called after each epoch's checkpoints are written, with that epoch's metrics;
    an exception it raises (e.g. optuna.TrialPruned) ends the run and propagates.

    Under torchrun every process calls this; rank 0 writes the files, logs and prints, and all of them return
    the same result.
    """
    with distributed.process_group() as group, _quiet_unless(group.is_main):
        try:
            return _train(config, dataset, on_epoch, group)
        except RuntimeError as e:
            failure = distributed.peer_failure(e, group)
            if failure is None:
                raise
            raise failure from e


@contextlib.contextmanager
def _quiet_unless(main: bool):
    """No progress bars, summaries or info logs from the processes other than rank 0 (they would repeat it)."""
    if main:
        yield
        return
    logger, quiet = logging.getLogger("builder"), console.quiet
    level, console.quiet = logger.level, True
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        console.quiet = quiet


def _train(
    config: TrainConfig, dataset: ImageDataset | None, on_epoch: Callable[[dict], None] | None, group: distributed.Group
) -> TrainResult:
    # Each process draws its own augmentation; the model's initial weights are rank 0's (DDP copies them).
    seed_everything(config.seed + group.rank)
    run_dir = Path(config.out_dir)
    with deterministic():
        run = _prepare(config, dataset, group)
        report, new = check_once(run.dataset)
        if group.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(
                json.dumps({**config.to_dict(), **run.meta.recipe, "preprocess": run.spec.to_dict()}, indent=2)
            )
            if new:  # once per dataset, not once per tune trial
                log_report(report)
            report.write(run_dir / "datacheck.json")
        start_epoch, history, best_accuracy, best_epoch = 0, [], -1.0, 0
        if config.resume:
            start_epoch, history, best_accuracy, best_epoch = _restore(run, run_dir / "last.pt")
            log.info("resuming %s after epoch %d (best val accuracy %.4f)", run_dir, start_epoch, best_accuracy)
        writer = _tensorboard_writer(run_dir / "tensorboard") if config.tensorboard and group.is_main else None
        started = time.monotonic()
        try:
            stopped_early = _epochs(run, run_dir, start_epoch, history, [best_accuracy, best_epoch], writer, on_epoch)
        finally:
            if writer is not None:
                writer.close()
    warning = chance_warning(history, run.dataset.val.labels)
    _print_summary(history, warning)
    best = max(history, key=lambda h: h["val_accuracy"]) if history else {"val_accuracy": best_accuracy}
    return TrainResult(
        run_dir,
        run_dir / "best.pt",
        best["val_accuracy"],
        len(history),
        time.monotonic() - started,
        history,
        stopped_early,
        (warning,) if warning else (),
    )


def chance_warning(history: list[dict], val_labels: Sequence[int]) -> str | None:
    """A warning for a run whose training accuracy climbed (at least halfway from chance to 1) while its best
    validation accuracy stayed within two standard errors of chance (what naming the validation split's most
    frequent class for every image scores); None otherwise."""
    if not history or not len(val_labels):
        return None
    counts = np.bincount(np.asarray(val_labels))
    total, chance = int(counts.sum()), float(counts.max() / counts.sum())
    margin = max(2 * math.sqrt(chance * (1 - chance) / total), 0.02)
    best_val = max(h["val_accuracy"] for h in history)
    best_train = max(h["train_accuracy"] for h in history)
    if best_val > chance + margin or best_train < chance + (1 - chance) / 2:
        return None
    return (
        f"validation accuracy stayed at chance (best {best_val:.3f}, chance {chance:.3f} on {total} images) "
        f"while training accuracy reached {best_train:.3f}: this model does not generalize; do not publish it"
    )


def _epochs(
    run: _Run,
    run_dir: Path,
    start_epoch: int,
    history: list[dict],
    best: list,
    writer,
    on_epoch: Callable[[dict], None] | None,
) -> bool:
    """Epochs `start_epoch + 1 .. config.epochs`; returns whether early stopping ended them."""
    config, group = run.config, run.group
    freeze_epochs = config.fine_tuning()[0]
    backbone_frozen: bool | None = None  # as the trainer was last wrapped
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if config.patience and epoch - 1 - best[1] >= config.patience:
            log.info(
                "early stop: no better val accuracy for %d epochs (best %.4f at epoch %d)",
                config.patience,
                best[0],
                best[1],
            )
            return True
        started = time.monotonic()
        distributed.set_epoch(run.train_loader.sampler, epoch)
        frozen = config.freeze_backbone or epoch <= freeze_epochs
        if freeze_epochs and not config.freeze_backbone and frozen != backbone_frozen:
            set_backbone_trainable(run.model, not frozen)
            if group.active:
                # DistributedDataParallel averages the gradients of the parameters that required them when it
                # was made: wrapped anew whenever the trainable set changes, none is left unsynchronized.
                run.trainer = distributed.wrap(run.model, group)
            backbone_frozen = frozen
        # Both losses keep their weights in a `weight` buffer; None is plain (unweighted) averaging.
        run.criterion.weight = run.class_weights if epoch >= config.class_weights_start else None
        # Counted in images, batch by batch: a few large batches are still a moving count.
        # Counted per process: each trains on its share.
        shown = len(run.train_loader.sampler)  # type: ignore[arg-type]
        with progress_bar(f"epoch {epoch}/{config.epochs}", total=shown, unit="images") as advance:
            record = train_one_epoch(
                run.trainer or run.model,
                run.train_loader,
                run.optimizer,
                run.scheduler,
                run.criterion,
                accum_steps=config.accum_steps,
                clip_grad=config.clip_grad,
                mixer=run.mixer,
                device=run.device,
                scaler=run.scaler,
                frozen_backbone=frozen,
                advance=advance,
            )
        if run.calibration_loader is not None and not frozen:
            # Validation, checkpoints and the exported model all normalize with these statistics.
            recalibrate_batchnorm(run.model, run.calibration_loader, run.device)
            distributed.broadcast_buffers(run.model, group)
        with progress_bar(
            f"epoch {epoch}/{config.epochs} val", total=len(run.val_loader.dataset), unit="images", transient=True
        ) as advance:
            validation = evaluate_loader(
                run.model, run.val_loader, len(run.dataset.classes), run.device, advance, sharded=group.active
            )
        record = {"epoch": epoch, **record, **validation, "seconds": round(time.monotonic() - started, 2)}
        history.append(record)
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val accuracy %.4f",
            epoch,
            record["train_loss"],
            record["val_loss"],
            record["val_accuracy"],
        )
        improved = record["val_accuracy"] > best[0]
        if improved:
            best[:] = [record["val_accuracy"], epoch]
        rng_by_rank = distributed.gather(_rng_state(run.generator), group) if group.active else None
        if group.is_main:
            meta = run.meta.replace(epoch=epoch, val_accuracy=record["val_accuracy"])
            resume = _resume_state(run, epoch, history, (best[0], best[1]), rng_by_rank)
            save_model(run.model, meta, run_dir / "last.pt", resume=resume)
            if improved:
                save_model(run.model, meta, run_dir / "best.pt")
            _write_records(run_dir, history)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            writer.flush()
        if on_epoch is not None:
            on_epoch(record)
    return False


def _print_summary(history: list[dict], warning: str | None = None) -> None:
    if not history:
        return
    if warning:
        log.warning(warning)
    best = max(history, key=lambda h: h["val_accuracy"])["epoch"]
    columns = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_recall", "lr")
    try:
        from rich.table import Table
    except ImportError:
        for record in history:
            print("  ".join(f"{c} {record[c]:.4g}" for c in columns), file=console.file)
        if warning:
            print(f"WARNING: {warning}", file=console.file)
        return
    table = Table(title="training summary (* best)")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for record in history:
        table.add_row(
            f"{record['epoch']}{'*' if record['epoch'] == best else ''}",
            *(f"{record[c]:.4f}" if c != "lr" else f"{record[c]:.2e}" for c in columns[1:]),
        )
    console.print(table)
    if warning:
        console.print(f"[bold red]WARNING:[/] {warning}", markup=True, highlight=False)
