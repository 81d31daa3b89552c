"""Reading a checkpoint file: tensors and plain values only, and one line when the file is not one of ours."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError


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
        reason = ("it holds pickled Python objects, not a state dict" if zipfile.is_zipfile(path)
                  else "not a PyTorch file")
    except Exception:  # torch raises zipfile's, pickle's and its own errors for files it cannot read
        reason = "not a PyTorch file"
    else:
        if isinstance(payload, dict) and isinstance(payload.get("model"), Mapping) \
                and (isinstance(payload.get("meta"), dict) or not need_meta):
            return payload
        reason = "a PyTorch file without the model state and metadata this builder writes"
    raise CheckpointError(f"{prefix}{path} is not a checkpoint of this builder ({reason})")
