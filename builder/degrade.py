"""Graceful degradation of a served model to a faster one of its family, written into the model's config.

The setting lives in the slow model's config.pbtxt `parameters` (server/degrade.py reads them through
Triton), like a rollout: every gateway follows the repository within its config cache's lifetime, and a
restart loses nothing. Both models must take the same preprocessing, labels and input, since the gateway
preprocesses a request once whichever model answers it. The accuracy the faster model costs is recorded
beside the setting, from both models' lineage (build.json's val_accuracy of the versions served).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from server.degrade import PARAMETER_PREFIX, Degrade
from server.preprocess import PARAMETER_PREFIX as PREPROCESS_PREFIX

from . import model_config
from .errors import BuilderError, DegradeError
from .model_config import ModelConfig

LABELS_PARAMETER = "labels"
# A model name as publish accepts it (and the gateway's routes): never a path out of the repository.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _read(repository: Path, name: str) -> tuple[Path, ModelConfig]:
    model_dir = Path(repository) / name
    try:
        return model_dir, model_config.read_config(model_dir)
    except BuilderError as e:
        raise DegradeError(str(e)) from None


def _interface(config: ModelConfig) -> dict[str, Any]:
    """What a batch made for one model must agree with in the other: preprocessing, labels and input (its
    dims hold the batch axis where the model does not batch). The gateway splits a batch by the answering
    model's own max batch size."""
    return {
        "parameters": {
            k: v for k, v in config.parameters.items() if k.startswith(PREPROCESS_PREFIX) or k == LABELS_PARAMETER
        },
        "inputs": [(t.data_type, t.dims) for t in config.inputs],
        "batching": config.max_batch_size > 0,
    }


def served_accuracy(model_dir: Path, config: ModelConfig) -> float | None:
    """The recorded top-1 (0..1) of the newest version the config serves; None where its lineage has none."""
    served = model_config.served_versions(config, model_config.present_versions(model_dir))
    if not served:
        return None
    try:
        value = json.loads((model_dir / str(served[-1]) / "build.json").read_text()).get("val_accuracy")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None


def enable(repository: Path, name: str, to: str, in_flight: int, to_in_flight: int | None = None) -> Degrade:
    """Past `in_flight` requests of `name` in flight in a gateway worker, the next is answered by `to`,
    unless `to` has `to_in_flight` (default: `in_flight`) in flight itself; then 429."""
    if in_flight < 1 or (to_in_flight is not None and to_in_flight < 1):
        raise DegradeError("in-flight thresholds are at least 1")
    if not MODEL_NAME.fullmatch(to):
        raise DegradeError(f"--to {to!r} is not a model name")
    if to == name:
        raise DegradeError(f"model {name!r} cannot degrade to itself")
    model_dir, config = _read(repository, name)
    fast_dir, fast = _read(repository, to)
    if _interface(config) != _interface(fast):
        raise DegradeError(
            f"model {to!r} takes other preprocessing, labels or input than {name!r}: a request preprocessed "
            f"for one cannot be answered by the other"
        )
    slow_accuracy, fast_accuracy = served_accuracy(model_dir, config), served_accuracy(fast_dir, fast)
    cost = None if slow_accuracy is None or fast_accuracy is None else round(100 * (slow_accuracy - fast_accuracy), 4)
    degrade = Degrade(to, in_flight, in_flight if to_in_flight is None else to_in_flight, cost)
    model_config.write_config(model_dir, with_degrade(config, degrade))
    return degrade


def with_degrade(config: ModelConfig, degrade: Degrade | None) -> ModelConfig:
    """`config` with `degrade`'s parameters in place of any it had (none: without the setting)."""
    kept = {k: v for k, v in config.parameters.items() if not k.startswith(PARAMETER_PREFIX)}
    return dataclasses.replace(config, parameters={**kept, **(degrade.to_parameters() if degrade else {})})


def disable(repository: Path, name: str) -> Degrade | None:
    """The model answers every request itself again; returns the setting it had, if any."""
    model_dir, config = _read(repository, name)
    try:
        current = setting(config)
    except DegradeError:
        current = None  # unreadable (edited by hand): cleared all the same
    if any(k.startswith(PARAMETER_PREFIX) for k in config.parameters):
        model_config.write_config(model_dir, with_degrade(config, None))
    return current


def setting(config: ModelConfig) -> Degrade | None:
    try:
        return Degrade.from_parameters(config.parameters)
    except (KeyError, ValueError) as e:
        raise DegradeError(f"model {config.name!r} has degrade parameters that cannot be read: {e}") from e


def state(repository: Path, name: str) -> dict[str, Any]:
    _, config = _read(repository, name)
    current = setting(config)
    return {"model": name, "degrade": dataclasses.asdict(current) if current else None}
