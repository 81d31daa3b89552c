"""What an exported ONNX file carries about its model (`metadata_props`): one writer, one reader.

`builder export` (and QAT) write the preprocessing spec, the labels, the dataset recipe and the lineage
of the checkpoint; quantization adds its own keys. Every later stage reads them back through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from server.preprocess import PreprocessSpec

from .errors import OnnxFileError, error_line
from .train_config import dataset_recipe, serving_preprocess

# The key of `builder evaluate --gateway-decode`'s measurement (JSON: reduced_scale, exact_top1, reduced_top1,
# images, jpeg_images, max_accuracy_drop), which `builder publish` writes into config.pbtxt.
DECODE_METADATA = "decode"

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

    def with_interface(
        self,
        *,
        spec: PreprocessSpec | None = None,
        labels: Sequence[str] | None = None,
        dataset: str | None = None,
    ) -> OnnxMeta:
        """This metadata with the preprocessing, labels or dataset given for a model exported elsewhere, in
        its props too, so that the stages write them on exactly as `builder export` writes its own."""
        props = dict(self.props)
        if spec is not None:
            props["preprocess"] = json.dumps(spec.to_dict())
        if labels is not None:
            props["labels"] = json.dumps([str(label) for label in labels])
        if dataset is not None:
            props["dataset"] = json.dumps({**self.dataset_recipe, "source": str(dataset)})
        return OnnxMeta.from_props(props)

    def with_dataset_labels(self, classes: Sequence[str], num_classes: int | None) -> OnnxMeta:
        """Labels from the dataset's class folders (ImageFolder order: output i is folder i), where the model
        carries none and has one output per folder."""
        if "labels" in self.props or num_classes != len(classes):
            return self
        return self.with_interface(labels=classes)


def classifier_dims(proto: onnx.ModelProto) -> tuple[tuple[int | None, ...], int | None]:
    """The graph's input dims without the batch axis, and its number of classes (None where not fixed)."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]

    def dims(value) -> tuple[int | None, ...]:
        return tuple(d.dim_value or None for d in value.type.tensor_type.shape.dim)

    input_dims = dims(inputs[0])[1:] if inputs else ()
    output_dims = dims(proto.graph.output[0]) if proto.graph.output else ()
    return input_dims, output_dims[1] if len(output_dims) == 2 else None


def model_interface(
    path: Path,
    *,
    preprocess: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    dataset: str | None = None,
) -> OnnxMeta:
    """What the stages need of the ONNX file `path`: its metadata with the given preprocessing (publish's
    flags by name, resize, crop, mean, std, color_mode: `serving_preprocess` over the carried spec), labels
    and dataset put in. OnnxFileError when it has no preprocessing either way, or when they do not fit the
    graph."""
    path = Path(path)
    proto = load_onnx(path)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        # An image classifier takes one batch of images; what else a graph wants, no flag can give it.
        raise OnnxFileError(
            f"{path} takes {len(inputs)} inputs ({', '.join(inputs) or 'none'}); an image classifier takes one"
        )
    meta = OnnxMeta.from_props(metadata_of(proto), source=path)
    given = {key: value for key, value in (preprocess or {}).items() if value is not None}
    spec = serving_preprocess(meta.preprocess.to_dict() if meta.preprocess else None, **given) if given else None
    meta = meta.with_interface(spec=spec, labels=labels, dataset=dataset)
    if meta.preprocess is None:
        raise OnnxFileError(
            f"{path} carries no preprocessing spec: give the preprocessing it was trained with "
            "(--resize, --crop, --mean, --std, --color-mode), or export it with `builder export`"
        )
    input_dims, num_classes = classifier_dims(proto)
    expected = meta.preprocess.input_shape
    if tuple(input_dims) != expected:
        shown = " x ".join("?" if d is None else str(d) for d in input_dims) or "no input"
        raise OnnxFileError(
            f"the preprocessing makes {' x '.join(map(str, expected))} inputs ({meta.preprocess.color_mode}, "
            f"crop {meta.preprocess.image_size}) but {path} takes {shown}"
        )
    if "labels" in meta.props and num_classes is not None and len(meta.classes) != num_classes:
        raise OnnxFileError(f"{len(meta.classes)} labels for {path}, which has {num_classes} outputs")
    return meta


def read_labels(path: Path) -> list[str]:
    """A labels file, one label per line (blank lines skipped)."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else error_line(e)
        raise OnnxFileError(f"labels file {path} cannot be read: {reason}") from e


def read_onnx_meta(path: Path) -> OnnxMeta:
    return OnnxMeta.from_props(read_metadata(path), source=path)


def record_metadata(path: Path, metadata: Mapping[str, str]) -> Path:
    """Add or overwrite metadata_props entries of the ONNX file `path` in place, replaced in one rename.
    Weights stored beside it stay where they are: the graph still names them by their relative paths."""
    path = Path(path)
    proto = load_onnx(path)
    set_metadata(proto, metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except OSError as e:
        raise OnnxFileError(f"cannot record in {path}: {e.strerror or error_line(e)}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_with_metadata(source: Path, output: Path, meta: OnnxMeta) -> Path:
    """`source` with `meta`'s props, as one file (weights stored beside it are read in)."""
    try:
        proto = onnx.load(str(source))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:  # weights beside it missing or unreadable
        raise OnnxFileError(f"could not read {source} with its weights: {error_line(e)}") from e
    set_metadata(proto, meta.props)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
