"""Structured channel pruning with Torch-Pruning, iterative, with fine-tuning between steps.

The pruned network is physically smaller (fewer channels), not masked. It is saved as an ordinary
checkpoint: the state_dict plus, in `meta["layer_shapes"]`, the channel counts of every layer.
`load_model()` rebuilds it from `create_model()` by replacing each recorded layer with one of the
recorded width, then loads the weights. So the file holds only tensors and plain data: it loads with
`torch.load(weights_only=True)` (no pickled module, no code run on load) and needs neither the
pruning code nor the pruning library to reload.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoints import read_checkpoint
from .data import ImageDataset, TorchSplit
from .errors import BuilderError, CheckpointError
from .evaluate import count_macs_and_params, dataset_recipe, load_run_dataset
from .models import create_model
from .progress import progress_bar
from .train import load_checkpoint, seed_everything, train_transform, warmup_cosine

log = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2")
SCOPES = ("global", "uniform")
TARGETS = ("macs", "params")
# Verified end to end (prune, fine-tune, reload, ONNX export). The MobileNetV3 variants prune too, but
# their squeeze-excitation widths round badly at multiples of 8; add them here once measured.
PRUNABLE_ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
MAX_LAYER_PRUNING = 0.9


class PruneError(BuilderError):
    """The model cannot be pruned as asked."""


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


# ---- saving and reloading a pruned network ----

def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """The width of every layer whose width pruning can change."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {"kind": "conv", "in": module.in_channels, "out": module.out_channels,
                            "groups": module.groups}
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = {"kind": "bn", "features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"kind": "linear", "in": module.in_features, "out": module.out_features}
    return shapes


def _resized(module: nn.Module, shape: Mapping) -> nn.Module:
    if shape["kind"] == "conv":
        return nn.Conv2d(shape["in"], shape["out"], module.kernel_size, module.stride, module.padding,
                         module.dilation, shape["groups"], module.bias is not None, module.padding_mode)
    if shape["kind"] == "bn":
        return nn.BatchNorm2d(shape["features"], module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    return nn.Linear(shape["in"], shape["out"], module.bias is not None)


def apply_layer_shapes(model: nn.Module, shapes: Mapping[str, Mapping]) -> nn.Module:
    """Replace each recorded layer of a freshly created model with one of the recorded width."""
    for name, shape in shapes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _resized(getattr(parent, child), shape))
    return model


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """Any checkpoint this builder writes (trained or pruned), rebuilt in eval mode."""
    path = Path(path)
    payload = read_checkpoint(path)
    shapes = payload["meta"].get("layer_shapes")
    if not shapes:
        return load_checkpoint(path)
    meta = payload["meta"]
    try:
        model = create_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                             image_size=meta["image_size"])
        apply_layer_shapes(model, shapes)
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a pruned checkpoint this builder can rebuild: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    model.eval()
    return model, meta


def save_model(model: nn.Module, meta: dict, path: Path) -> Path:
    """state_dict + layer widths + meta, written beside and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "meta": {**meta, "layer_shapes": layer_shapes(model)}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


# ---- pruning ----

def _classifier(model: nn.Module, num_classes: int) -> list[nn.Module]:
    # The output layer keeps one unit per class.
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _measure(model: nn.Module, input_shape, target: str) -> tuple[int, int, int]:
    macs, params = count_macs_and_params(model, input_shape)
    return macs, params, macs if target == "macs" else params


def make_pruner(model: nn.Module, meta: Mapping, config: PruneConfig):
    import torch_pruning as tp

    example = torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
    importance = tp.importance.MagnitudeImportance(p=1 if config.importance == "l1" else 2)
    try:
        return tp.pruner.MetaPruner(
            model, example, importance=importance, global_pruning=config.scope == "global",
            pruning_ratio=MAX_LAYER_PRUNING, max_pruning_ratio=MAX_LAYER_PRUNING,
            iterative_steps=config.increments, ignored_layers=_classifier(model, meta["num_classes"]),
            round_to=config.round_to,
        )
    except Exception as e:  # the dependency graph fails on operations it cannot trace through
        raise PruneError(f"Torch-Pruning cannot build the dependency graph of {meta['arch']}: {e}") from e


def prune_model(model: nn.Module, meta: Mapping, config: PruneConfig, dataset: ImageDataset | None = None,
                ) -> tuple[nn.Module, list[dict]]:
    """Prune in `config.steps` rounds to the target, fine-tuning after each; returns the model and history."""
    if meta["arch"] not in PRUNABLE_ARCHITECTURES:
        raise PruneError(f"architecture {meta['arch']!r} cannot be pruned here; prunable: "
                         f"{', '.join(PRUNABLE_ARCHITECTURES)}")
    seed_everything(config.seed)
    input_shape = (meta["in_channels"], meta["image_size"], meta["image_size"])
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
            raise PruneError(f"could not reach {config.keep_ratio:.0%} of the {config.target} "
                             f"(stopped at {current / original:.0%}); raise --keep-ratio")
        accuracy = finetune(model, meta, config, dataset) if config.finetune_epochs > 0 else None
        history.append({"step": step, "macs": macs, "params": params, "kept": current / original,
                        "val_accuracy": accuracy})
        log.info("prune step %d/%d: %s at %.1f%% of the original, val accuracy %s", step, config.steps,
                 config.target, 100 * current / original, "n/a" if accuracy is None else f"{accuracy:.4f}")
    return model, history


def finetune(model: nn.Module, meta: Mapping, config: PruneConfig, dataset: ImageDataset | None = None) -> float:
    """A short AdamW run with warmup and cosine decay on the training split; returns val accuracy."""
    from server.preprocess import PreprocessSpec
    from .train import eval_transform, evaluate_accuracy

    dataset = dataset or load_run_dataset(dataset_recipe(meta))
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TorchSplit(dataset.train, dataset.color_mode, train_transform(spec)),
                        batch_size=config.batch_size, shuffle=True, generator=generator)
    total_steps = max(1, math.ceil(config.finetune_epochs * len(loader)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=max(1, total_steps // 10), total_steps=total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    done = 0
    with progress_bar("fine-tune", total=total_steps) as advance:
        while done < total_steps:
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                done += 1
                advance(f"loss {loss.item():.4f}")
                if done >= total_steps:
                    break
    val_loader = DataLoader(TorchSplit(dataset.val, dataset.color_mode, eval_transform(spec)), batch_size=128)
    accuracy = evaluate_accuracy(model, val_loader)
    model.eval()
    return accuracy


def prune(checkpoint: Path, output: Path, config: PruneConfig = PruneConfig(),
          dataset: ImageDataset | None = None) -> PruneResult:
    """Prune the model of `checkpoint` and write the smaller network to `output` (a reloadable checkpoint)."""
    started = time.monotonic()
    model, meta = load_model(checkpoint)
    input_shape = (meta["in_channels"], meta["image_size"], meta["image_size"])
    macs_before, params_before = count_macs_and_params(model, input_shape)
    model, history = prune_model(model, meta, config, dataset)
    macs_after, params_after = count_macs_and_params(model, input_shape)
    accuracy = history[-1]["val_accuracy"] if history else None
    pruned_meta = {**{k: v for k, v in meta.items() if k != "layer_shapes"},
                   "val_accuracy": accuracy if accuracy is not None else meta.get("val_accuracy"),
                   "pruning": {**asdict(config), "source_checkpoint": str(Path(checkpoint).resolve()),
                               "macs_before": macs_before, "macs_after": macs_after,
                               "params_before": params_before, "params_after": params_after,
                               "history": history}}
    save_model(model, pruned_meta, output)
    log.info("pruned %s -> %s: MACs %.1f%%, parameters %.1f%% of the original", checkpoint, output,
             100 * macs_after / macs_before, 100 * params_after / params_before)
    return PruneResult(Path(output), macs_before, macs_after, params_before, params_after,
                       time.monotonic() - started, history)
