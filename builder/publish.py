"""Publishing an ONNX classifier as the next version of a model in a Triton model repository.

Layout written (what NVIDIA's tritonserver container expects):

    model_repository/NAME/config.pbtxt      backend, batching, preprocessing spec, labels
    model_repository/NAME/labels.txt        one label per line (Triton's classification extension)
    model_repository/NAME/<version>/model.py    the Python-backend model (runs ONNX Runtime)
    model_repository/NAME/<version>/model.onnx
    model_repository/NAME/<version>/build.json  where this version came from

Every file is staged beside its destination and renamed into place, so a server polling the
repository never sees a half-written version.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import onnx

from server.preprocess import PreprocessSpec

from . import model_config
from .errors import PublishError

BACKEND_MODEL = Path(__file__).parent / "backend" / "model.py"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELS_PARAMETER = "labels"


@dataclass(frozen=True)
class PublishSettings:
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64
    instance_count: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime uses every core


@dataclass(frozen=True)
class OnnxClassifier:
    """What publish needs to know about an ONNX image classifier."""

    input_name: str
    input_dims: tuple[int, ...]  # without the batch axis
    output_names: tuple[str, ...]
    num_classes: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class PublishedVersion:
    model_dir: Path
    version: int

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)


def _static_dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def inspect_onnx(path: Path) -> OnnxClassifier:
    """Input and output names and shapes read from the graph; fails clearly on anything else."""
    path = Path(path)
    if not path.is_file():
        raise PublishError(f"ONNX file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... for foreign files
        raise PublishError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PublishError(f"{path} has {len(inputs)} inputs; an image classifier takes exactly one")
    input_dims = _static_dims(inputs[0])
    if len(input_dims) != 4 or any(d is None for d in input_dims[1:]):
        raise PublishError(f"{path}: input {inputs[0].name!r} must be N x C x H x W with fixed C, H, W")
    output_dims = _static_dims(proto.graph.output[0])
    if len(output_dims) != 2 or output_dims[1] is None:
        raise PublishError(f"{path}: output {proto.graph.output[0].name!r} must be N x classes")
    return OnnxClassifier(
        input_name=inputs[0].name,
        input_dims=tuple(input_dims[1:]),
        output_names=tuple(o.name for o in proto.graph.output),
        num_classes=output_dims[1],
        metadata={p.key: p.value for p in proto.metadata_props},
    )


def _next_version(model_dir: Path) -> int:
    versions = [int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()] if model_dir.exists() else []
    return max(versions, default=0) + 1


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_config(name: str, model: OnnxClassifier, spec: PreprocessSpec, labels: Sequence[str],
                 settings: PublishSettings) -> model_config.ModelConfig:
    parameters = {
        **spec.to_parameters(),
        LABELS_PARAMETER: json.dumps(list(labels)),
        "onnxruntime.intra_op_threads": str(settings.intra_op_threads),
    }
    return model_config.ModelConfig(
        name=name,
        inputs=(model_config.TensorSpec(model.input_name, model.input_dims),),
        outputs=tuple(
            model_config.TensorSpec(out, (model.num_classes,), label_filename="labels.txt" if i == 0 else None)
            for i, out in enumerate(model.output_names)
        ),
        backend="python",
        max_batch_size=settings.max_batch_size,
        dynamic_batching=model_config.DynamicBatching(
            preferred_batch_sizes=settings.preferred_batch_sizes,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_size=settings.max_queue_size,
        ),
        instance_count=settings.instance_count,
        parameters=parameters,
    )


def publish(
    onnx_path: Path,
    repository: Path,
    name: str,
    *,
    spec: PreprocessSpec | None = None,
    labels: Sequence[str] | None = None,
    settings: PublishSettings = PublishSettings(),
) -> PublishedVersion:
    """Write `onnx_path` as the next version of `name`; spec and labels default to the file's metadata."""
    if not MODEL_NAME.match(name):
        raise PublishError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 64)")
    model = inspect_onnx(onnx_path)
    if spec is None:
        if "preprocess" not in model.metadata:
            raise PublishError(f"{onnx_path} carries no preprocessing spec; give the preprocessing flags")
        spec = PreprocessSpec.from_dict(json.loads(model.metadata["preprocess"]))
    if labels is None:
        labels = json.loads(model.metadata["labels"]) if "labels" in model.metadata else [
            str(i) for i in range(model.num_classes)
        ]
    if len(labels) != model.num_classes:
        raise PublishError(f"{len(labels)} labels given for a model with {model.num_classes} classes")
    if tuple(model.input_dims) != spec.input_shape:
        raise PublishError(f"model input is {model.input_dims} but the preprocessing makes {spec.input_shape}")
    config = build_config(name, model, spec, labels, settings)

    repository = Path(repository)
    try:
        repository.mkdir(parents=True, exist_ok=True)
        return _write_version(Path(onnx_path), repository, name, config, labels, model)
    except OSError as e:
        raise PublishError(f"cannot write to model repository {repository}: {e.strerror or e}") from e


def _stage_version(version_dir: Path, onnx_path: Path, lineage: dict) -> None:
    version_dir.mkdir(exist_ok=True)
    shutil.copy2(onnx_path, version_dir / "model.onnx")
    shutil.copy2(BACKEND_MODEL, version_dir / "model.py")
    (version_dir / "build.json").write_text(json.dumps(lineage, indent=2, default=str))


def _write_version(onnx_path: Path, repository: Path, name: str, config: model_config.ModelConfig,
                   labels: Sequence[str], model: OnnxClassifier) -> PublishedVersion:
    model_dir = repository / name
    version = _next_version(model_dir)
    lineage = {
        "name": name,
        "version": version,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_onnx": str(Path(onnx_path).resolve()),
        "onnx_metadata": model.metadata,
        "config": asdict(config),
    }
    config_text, labels_text = model_config.render(config), "\n".join(labels) + "\n"
    if not model_dir.exists() and _publish_new_model(model_dir, version, onnx_path, lineage, config_text, labels_text):
        return PublishedVersion(model_dir, version)
    # Triton ignores version folders whose names are not numbers, so a new version is staged in a
    # hidden folder of the model and renamed into place complete.
    model_dir.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        _stage_version(staging, onnx_path, lineage)
        os.rename(staging, model_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_atomic(model_dir / "labels.txt", labels_text)
    _write_atomic(model_dir / "config.pbtxt", config_text)
    return PublishedVersion(model_dir, version)


def _publish_new_model(model_dir: Path, version: int, onnx_path: Path, lineage: dict, config_text: str,
                       labels_text: str) -> bool:
    """Stage a whole new model beside the repository and rename it in; False where that cannot be done.

    Triton treats every folder of the repository as a model, hidden ones too, so the staging folder
    must live outside it: in its parent, which is only possible on the same filesystem.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-staging-", dir=model_dir.parent.parent))
    except OSError:
        return False
    try:
        _stage_version(staging / str(version), onnx_path, lineage)
        (staging / "labels.txt").write_text(labels_text)
        (staging / "config.pbtxt").write_text(config_text)
        os.rename(staging, model_dir)
        return True
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
