"""Structured channel pruning with Torch-Pruning, iterative, with fine-tuning between steps.

The pruned network is physically smaller (fewer channels), not masked. It is saved as an ordinary
checkpoint whose `ModelMeta.layer_shapes` records the channel counts of every layer, which
`builder.checkpoint.load_model()` rebuilds: the file needs neither the pruning code nor the pruning
library to reload.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import ModelMeta, layer_shapes, load_model, save_model
from .data import ImageDataset, TorchSplit, load_run_dataset
from .errors import PruneError
from .loop import evaluate_accuracy, seed_everything
from .loop import finetune as run_finetune
from .models import count_macs_and_params
from .train_config import ARCHITECTURES
from .transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2")
SCOPES = ("global", "uniform")
TARGETS = ("macs", "params")
# Every architecture the builder trains prunes end to end (prune, fine-tune, reload, ONNX export).
PRUNABLE_ARCHITECTURES = ARCHITECTURES
MAX_LAYER_PRUNING = 0.9


@dataclass(frozen=True)
class PruneConfig:
    target: str = "macs"  # what `keep_ratio` limits: "macs" or "params"
    keep_ratio: float = 0.5  # prune until at most this fraction of the original remains
    importance: str = "l1"  # channel magnitude norm: "l1" or "l2"
    scope: str = "global"  # "global": rank channels across layers; "uniform": same fraction per layer
    steps: int = 3  # prune-then-fine-tune rounds
    finetune_epochs: float = 1.0  # per step
    lr: float = 1e-3
    batch_size: int = 64
    round_to: int = 8  # channel counts stay multiples of this (tensor-core and SIMD friendly)
    # Channels go in this many small increments (up to 90% per layer), checking the target after
    # each: many increments land close to the target instead of overshooting it; fewer run faster.
    increments: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PruneError(f"prune target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.importance not in IMPORTANCES:
            raise PruneError(f"importance {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if self.scope not in SCOPES:
            raise PruneError(f"pruning scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if not 0.0 < self.keep_ratio < 1.0:
            raise PruneError(f"keep ratio {self.keep_ratio} must be between 0 and 1 (e.g. 0.5 keeps half)")
        if self.steps < 1 or self.round_to < 1 or self.increments < 1:
            raise PruneError("steps, round_to and increments must be at least 1")


@dataclass(frozen=True)
class PruneResult:
    checkpoint: Path
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    seconds: float
    history: list[dict] = field(default_factory=list)


# ---- pruning ----


def _classifier(model: nn.Module, num_classes: int) -> list[nn.Module]:
    # The output layer keeps one unit per class.
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _measure(model: nn.Module, input_shape, target: str) -> tuple[int, int, int]:
    macs, params = count_macs_and_params(model, input_shape)
    return macs, params, macs if target == "macs" else params


def make_pruner(model: nn.Module, meta: ModelMeta, config: PruneConfig):
    import torch_pruning as tp

    example = torch.zeros(1, *meta.input_shape)
    importance = tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2)
    try:
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            global_pruning=config.scope == "global",
            pruning_ratio=MAX_LAYER_PRUNING,
            max_pruning_ratio=MAX_LAYER_PRUNING,
            iterative_steps=config.increments,
            ignored_layers=_classifier(model, meta.num_classes),
            round_to=config.round_to,
        )
    except Exception as e:  # the dependency graph fails on operations it cannot trace through
        raise PruneError(f"Torch-Pruning cannot build the dependency graph of {meta.arch}: {e}") from e


def prune_model(
    model: nn.Module,
    meta: ModelMeta,
    config: PruneConfig,
    dataset: ImageDataset | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Prune in `config.steps` rounds to the target, fine-tuning after each; returns the model and history."""
    if meta.arch not in PRUNABLE_ARCHITECTURES:
        raise PruneError(
            f"architecture {meta.arch!r} cannot be pruned here; prunable: {', '.join(PRUNABLE_ARCHITECTURES)}"
        )
    seed_everything(config.seed)
    input_shape = meta.input_shape
    _, _, original = _measure(model, input_shape, config.target)
    pruner = make_pruner(model, meta, config)
    history = []
    for step in range(1, config.steps + 1):
        # Geometric milestones: each round removes the same fraction of what is left.
        goal = original * config.keep_ratio ** (step / config.steps)
        current = original
        while current > goal and pruner.current_step < config.increments:
            pruner.step()
            macs, params, current = _measure(model, input_shape, config.target)
        if current > goal:
            raise PruneError(
                f"could not reach {config.keep_ratio:.0%} of the {config.target} "
                f"(stopped at {current / original:.0%}); raise --keep-ratio"
            )
        accuracy = finetune(model, meta, config, dataset) if config.finetune_epochs > 0 else None
        history.append(
            {"step": step, "macs": macs, "params": params, "kept": current / original, "val_accuracy": accuracy}
        )
        log.info(
            "prune step %d/%d: %s at %.1f%% of the original, val accuracy %s",
            step,
            config.steps,
            config.target,
            100 * current / original,
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )
    return model, history


def finetune(model: nn.Module, meta: ModelMeta, config: PruneConfig, dataset: ImageDataset | None = None) -> float:
    """A short fine-tune on the training split (on the GPU when there is one); returns val accuracy."""
    dataset = dataset or load_run_dataset(meta.dataset_recipe)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        TorchSplit(dataset.train, dataset.color_mode, train_transform(meta.spec)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    run_finetune(model, loader, epochs=config.finetune_epochs, lr=config.lr, weight_decay=0.01)
    val_loader = DataLoader(TorchSplit(dataset.val, dataset.color_mode, eval_transform(meta.spec)), batch_size=128)
    accuracy = evaluate_accuracy(model, val_loader)
    model.eval()
    return accuracy


def prune(
    checkpoint: Path, output: Path, config: PruneConfig = PruneConfig(), dataset: ImageDataset | None = None
) -> PruneResult:
    """Prune the model of `checkpoint` and write the smaller network to `output` (a reloadable checkpoint)."""
    started = time.monotonic()
    model, meta = load_model(checkpoint)
    input_shape = meta.input_shape
    macs_before, params_before = count_macs_and_params(model, input_shape)
    model, history = prune_model(model, meta, config, dataset)
    macs_after, params_after = count_macs_and_params(model, input_shape)
    accuracy = history[-1]["val_accuracy"] if history else None
    pruned_meta = meta.replace(
        val_accuracy=accuracy if accuracy is not None else meta.val_accuracy,
        layer_shapes=layer_shapes(model),
        pruning={
            **asdict(config),
            "source_checkpoint": str(Path(checkpoint).resolve()),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "params_before": params_before,
            "params_after": params_after,
            "history": history,
        },
    )
    save_model(model, pruned_meta, output)
    log.info(
        "pruned %s -> %s: MACs %.1f%%, parameters %.1f%% of the original",
        checkpoint,
        output,
        100 * macs_after / macs_before,
        100 * params_after / params_before,
    )
    return PruneResult(
        Path(output), macs_before, macs_after, params_before, params_after, time.monotonic() - started, history
    )
