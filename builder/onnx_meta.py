"""What an exported ONNX file carries about its model (`metadata_props`): one writer, one reader.

`builder export` (and QAT) write the preprocessing spec, the labels, the dataset recipe and the lineage
of the checkpoint; quantization adds its own keys. Every later stage reads them back through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from server.preprocess import PreprocessSpec

from .errors import OnnxFileError, error_line
from .train_config import dataset_recipe

if TYPE_CHECKING:  # checkpoint imports torch, which publishing an ONNX file does without
    from .checkpoint import ModelMeta


def load_onnx(path: Path) -> onnx.ModelProto:
    """The graph of an ONNX file (weights stored beside it are not read); OnnxFileError when there is no
    such file or it is not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends for files that are not ONNX
        raise OnnxFileError(f"{path} is not an ONNX model: {error_line(e)}") from e
    if not proto.opset_import:  # protobuf decodes some foreign bytes into an empty message
        raise OnnxFileError(f"{path} is not an ONNX model: it names no opset")
    return proto


def onnx_metadata(meta: ModelMeta, source: Path | None) -> dict[str, str]:
    """The metadata_props an export of the checkpoint `source` (with `meta`) carries; `pretrained`, the
    published weights its training started from, only where there were some."""
    pretrained = (meta.recipe.get("pretrained_weights") or {}).get("weights")
    return {
        **({"pretrained": pretrained} if pretrained else {}),
        "preprocess": json.dumps(meta.spec.to_dict()),
        "labels": json.dumps(list(meta.classes)),
        "dataset": json.dumps(meta.dataset_recipe),
        "source_checkpoint": str(Path(source).resolve()) if source else "",
        "arch": meta.arch,
        "val_accuracy": str(meta.val_accuracy if meta.val_accuracy is not None else ""),
        "pruned": "true" if meta.pruned else "false",
    }


def set_metadata(proto: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Add or overwrite metadata_props entries (the others stay)."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def metadata_of(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def read_metadata(path: Path) -> dict[str, str]:
    """All metadata_props of an ONNX file, as strings."""
    return metadata_of(load_onnx(path))


@dataclass(frozen=True)
class OnnxMeta:
    """The typed part of an exported model's metadata: enough to score it on its run's validation split."""

    preprocess: PreprocessSpec | None  # None: not exported by this builder
    classes: tuple[str, ...]
    dataset_recipe: dict  # source, val_fraction, seed (defaults where the file has none)
    has_dataset: bool  # whether the file names its dataset
    props: Mapping[str, str] = field(default_factory=dict, repr=False)  # every entry, as written

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, source: Path | str = "the ONNX file") -> OnnxMeta:
        """Parse metadata_props; OnnxFileError names `source` when an entry this builder writes is malformed."""
        try:
            recipe = json.loads(props["dataset"]) if props.get("dataset") else {}
            return cls(
                preprocess=PreprocessSpec.from_dict(json.loads(props["preprocess"])) if "preprocess" in props else None,
                classes=tuple(str(label) for label in json.loads(props.get("labels") or "[]")),
                dataset_recipe=dataset_recipe(
                    {
                        "dataset": recipe.get("source", "digits"),
                        "val_fraction": recipe.get("val_fraction", 0.2),
                        "seed": recipe.get("seed", 0),
                    }
                ),
                has_dataset="dataset" in props,
                props=dict(props),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OnnxFileError(
                f"{source}: its metadata (preprocess, labels or dataset) is malformed: {error_line(e)}"
            ) from e

    def with_dataset(self, source: str) -> OnnxMeta:
        return replace(self, dataset_recipe={**self.dataset_recipe, "source": source})


def read_onnx_meta(path: Path) -> OnnxMeta:
    return OnnxMeta.from_props(read_metadata(path), source=path)
