"""Checkpoints: what one records about its model (`ModelMeta`), and reading, rebuilding and writing one.

A checkpoint file is `{"model": state_dict, "meta": ModelMeta.to_dict()}` (plus "resume" in a run's
last.pt), tensors and plain values only, loaded with `weights_only=True`. A pruned network is physically
smaller: its meta records every layer's width (`layer_shapes`), and `load_model()` rebuilds it from
`create_model()` by swapping in layers of those widths, so reloading needs no pickled module and no
pruning library.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from server.preprocess import PreprocessSpec

from .errors import CheckpointError, error_line
from .models import InitReport, create_model, load_matching
from .train_config import dataset_recipe

log = logging.getLogger(__name__)

# The keys ModelMeta reads into fields; any other key of a checkpoint's meta is kept in `extra`.
_FIELDS = (
    "arch",
    "num_classes",
    "in_channels",
    "image_size",
    "classes",
    "preprocess",
    "config",
    "recipe",
    "epoch",
    "val_accuracy",
    "layer_shapes",
    "pruning",
)


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint records about its model, beside the weights."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...]
    preprocess: PreprocessSpec | None  # None only in checkpoints that record none (not this builder's runs)
    config: Mapping = field(default_factory=dict)  # the training run's settings (TrainConfig.to_dict())
    recipe: Mapping = field(default_factory=dict)  # what the run resolved: dropout, device, class weights...
    epoch: int | None = None  # the epoch these weights are from
    val_accuracy: float | None = None
    layer_shapes: Mapping | None = None  # pruned networks: every resizable layer's width
    pruning: Mapping | None = None  # pruned networks: the pruning settings and what they did
    extra: Mapping = field(default_factory=dict)  # keys this version does not know, kept as they were

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing spec, for the stages that cannot do without one."""
        if self.preprocess is None:
            raise CheckpointError("the checkpoint records no preprocessing spec; train it with `builder train`")
        return self.preprocess

    @property
    def pruned(self) -> bool:
        return bool(self.layer_shapes or self.pruning)

    @property
    def dataset_recipe(self) -> dict:
        """How the training run split its dataset (what `data.load_run_dataset` needs)."""
        return dataset_recipe(self.config)

    def replace(self, **changes) -> ModelMeta:
        return dataclasses.replace(self, **changes)

    def with_dataset(self, source: str) -> ModelMeta:
        """The same model, scored on another dataset (same split settings)."""
        return self.replace(config={**self.config, "dataset": source})

    def to_dict(self) -> dict:
        """The checkpoint's "meta" dict, in the format builders have always written."""
        data = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
        }
        if self.classes:
            data["classes"] = list(self.classes)
        if self.preprocess is not None:
            data["preprocess"] = self.preprocess.to_dict()
        data.update(config=dict(self.config), recipe=dict(self.recipe))
        for key in ("epoch", "val_accuracy", "layer_shapes", "pruning"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelMeta:
        """A checkpoint's "meta" dict; a CheckpointError names what is missing or malformed.

        What rebuilding the network needs is required (architecture, class count, input size); the rest
        is read where present."""
        try:
            classes = tuple(str(c) for c in data.get("classes") or ())
            preprocess = data.get("preprocess")
            if "num_classes" not in data and not classes:
                raise KeyError("num_classes")
            return cls(
                arch=str(data["arch"]),
                num_classes=int(data.get("num_classes", len(classes))),
                in_channels=int(data["in_channels"]),
                image_size=int(data["image_size"]),
                classes=classes,
                preprocess=PreprocessSpec.from_dict(preprocess) if preprocess is not None else None,
                config=dict(data.get("config") or {}),
                recipe=dict(data.get("recipe") or {}),
                epoch=data.get("epoch"),
                val_accuracy=data.get("val_accuracy"),
                layer_shapes=data.get("layer_shapes") or None,
                pruning=data.get("pruning"),
                extra={k: v for k, v in data.items() if k not in _FIELDS},
            )
        except KeyError as e:
            raise CheckpointError(f"the checkpoint's metadata has no {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's metadata is malformed: {error_line(e)}") from e


def read_checkpoint(path: Path, *, flag: str = "", need_meta: bool = True) -> dict:
    """The payload of a checkpoint this builder wrote: a dict with "model" (a state dict) and "meta" (unless
    `need_meta` is False: `--init` takes the weights alone).

    Loaded with `weights_only=True`, so no code in the file runs. Torch's own refusal spans several lines
    and proposes `weights_only=False`, which would run whatever the file holds: it is replaced by one line
    saying what the file is. `flag` names the option the path came from (e.g. "--init").
    """
    path = Path(path)
    prefix = f"{flag} " if flag else ""
    if not path.is_file():
        raise CheckpointError(f"{prefix}checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Torch writes zip archives; inside one, the weights-only unpickler met a class or a function.
        reason = (
            "it holds pickled Python objects, not a state dict" if zipfile.is_zipfile(path) else "not a PyTorch file"
        )
    except Exception:  # torch raises zipfile's, pickle's and its own errors for files it cannot read
        reason = "not a PyTorch file"
    else:
        if (
            isinstance(payload, dict)
            and isinstance(payload.get("model"), Mapping)
            and (isinstance(payload.get("meta"), dict) or not need_meta)
        ):
            return payload
        reason = "a PyTorch file without the model state and metadata this builder writes"
    raise CheckpointError(f"{prefix}{path} is not a checkpoint of this builder ({reason})")


# ---- rebuilding and writing ----


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """The width of every layer whose width pruning can change."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {
                "kind": "conv",
                "in": module.in_channels,
                "out": module.out_channels,
                "groups": module.groups,
            }
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = {"kind": "bn", "features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"kind": "linear", "in": module.in_features, "out": module.out_features}
    return shapes


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    # A Conv2d keeps its sizes as tuples of any length by type, of two by construction.
    first, second = value
    return first, second


def _resized(module: nn.Module, shape: Mapping) -> nn.Module:
    kind = shape["kind"]
    if kind == "conv" and isinstance(module, nn.Conv2d):
        padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        return nn.Conv2d(
            shape["in"],
            shape["out"],
            _pair(module.kernel_size),
            _pair(module.stride),
            padding,
            _pair(module.dilation),
            shape["groups"],
            module.bias is not None,
            module.padding_mode,
        )
    if kind == "bn" and isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape["features"], module.eps, module.momentum, module.affine, module.track_running_stats)
    if kind == "linear" and isinstance(module, nn.Linear):
        return nn.Linear(shape["in"], shape["out"], module.bias is not None)
    raise TypeError(f"a {kind!r} layer shape does not fit a {type(module).__name__} layer")


def apply_layer_shapes(model: nn.Module, shapes: Mapping[str, Mapping]) -> nn.Module:
    """Replace each recorded layer of a freshly created model with one of the recorded width."""
    for name, shape in shapes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _resized(getattr(parent, child), shape))
    return model


def load_model(path: Path) -> tuple[nn.Module, ModelMeta]:
    """Any checkpoint this builder writes (trained or pruned), rebuilt with its weights, in eval mode."""
    path = Path(path)
    payload = read_checkpoint(path)
    try:
        meta = ModelMeta.from_dict(payload["meta"])
        model = create_model(
            meta.arch, num_classes=meta.num_classes, in_channels=meta.in_channels, image_size=meta.image_size
        )
        if meta.layer_shapes:
            apply_layer_shapes(model, meta.layer_shapes)
        model.load_state_dict(payload["model"])
    except (CheckpointError, KeyError, TypeError, RuntimeError, ValueError, AttributeError) as e:
        # load_state_dict lists every missing key on lines of their own: the first line says enough.
        raise CheckpointError(f"{path} is not a checkpoint of this builder that can be rebuilt: {error_line(e)}") from e
    model.eval()
    return model, meta


def save_model(model: nn.Module, meta: ModelMeta, path: Path, *, resume: Mapping | None = None) -> Path:
    """Write the weights and `meta` (and, for a run's last.pt, the `resume` state) beside `path`, then
    rename into place: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "meta": meta.to_dict()}
    if resume is not None:
        payload["resume"] = dict(resume)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_init_weights(model: nn.Module, path: Path) -> InitReport:
    """Start `model` from a checkpoint of this builder (`--init`): matching tensors load, others are skipped
    (the classifier, when the class counts differ)."""
    state = read_checkpoint(Path(path), flag="--init", need_meta=False)["model"]
    report = load_matching(model, state, source=str(path))
    if report.loaded == 0:
        raise CheckpointError(f"--init {path}: no tensor matches this architecture (was it trained as another?)")
    log.info(
        "init from %s: %d tensors loaded, %d skipped%s",
        path,
        report.loaded,
        len(report.skipped),
        f" ({', '.join(s.split(':')[0] for s in report.skipped[:6])})" if report.skipped else "",
    )
    return report
