"""What ties a TensorRT plan to its source: SHA-256 digests of files and ONNX models, and the record
(`model.plan.json`) that `builder engine` writes beside each plan and `publish --plan` checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from .errors import EngineError


def engine_info_path(plan_path: Path) -> Path:
    return Path(plan_path).with_name(Path(plan_path).name + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_sha256(onnx_path: Path) -> str:
    """SHA-256 of an ONNX model's file; with external weights, of the file's and their files' digests."""
    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = sorted(
        {
            entry.value
            for tensor in proto.graph.initializer
            if uses_external_data(tensor)
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    if not locations:
        return file_sha256(onnx_path)
    digest = hashlib.sha256(file_sha256(onnx_path).encode())
    for location in locations:
        digest.update(location.encode() + b"\0" + file_sha256(onnx_path.parent / location).encode())
    return digest.hexdigest()


def read_engine_info(plan_path: Path) -> dict:
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise EngineError(f"engine {plan_path} does not exist")
    info_path = engine_info_path(plan_path)
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(
            f"{info_path} (the TensorRT version and GPU of {plan_path.name}) is missing or "
            f"unreadable; rebuild the engine with `builder engine`"
        ) from e
