"""Publishing an ONNX classifier as the next version of a model in a Triton model repository.

Layout written (what NVIDIA's tritonserver container expects):

    model_repository/NAME/config.pbtxt      backend, batching, preprocessing spec, labels
    model_repository/NAME/labels.txt        one label per line (Triton's classification extension)
    model_repository/NAME/<version>/model.py    the Python-backend model (runs ONNX Runtime)
    model_repository/NAME/<version>/model.onnx
    model_repository/NAME/<version>/build.json  where this version came from

For `target="gpu"` the version holds only `model.onnx` and the config names Triton's ONNX Runtime
backend with the TensorRT execution accelerator, which builds the engine on the serving GPU at load
time (one optimization profile, batch 1 to max_batch_size) and caches it; the published graph is named
after the model's bytes, so a new version never loads the engine of an older one. `publish_plan`
publishes a prebuilt TensorRT engine (`model.plan`) for the TensorRT backend.

Every file is staged beside its destination and renamed into place, so a server polling the
repository never sees a half-written version. A published version is never changed in place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from server.degrade import PARAMETER_PREFIX as DEGRADE_PREFIX
from server.preprocess import PARAMETER_PREFIX, PIXEL_DATATYPE, REDUCED_SCALE_PARAMETER, PreprocessSpec, model_input
from server.rollout import REFERENCE_PREFIX, new_rollout

from . import dali_preprocess, model_config
from .errors import BuilderError, PublishError, error_line
from .model_config import DEFAULT_TRITON_RELEASE, DEFAULT_TRT_CACHE_ROOT, TRITON_TENSORRT
from .onnx_meta import DECODE_METADATA, OnnxMeta, load_onnx, metadata_of
from .pixel_input import add_pixel_input
from .plans import file_sha256, onnx_sha256, read_engine_info
from .tensorrt_onnx import QDQ_OPS, qdq_problems

BACKEND_MODEL = Path(__file__).parent / "backend" / "model.py"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELS_PARAMETER = "labels"
# Top-1 points a new version may be below the serving one; the same default as a build's stage budget.
DEFAULT_MAX_ACCURACY_DROP = 1.0
# Triton reads a warmup sample's input_data_file from this folder of the model's directory (the one holding
# config.pbtxt, not a version folder: model_config.proto's ModelWarmup.Input; r24.10 backend_model_instance.cc).
WARMUP_DIR = "warmup"
WARMUP_IMAGES = 3

log = logging.getLogger(__name__)


TARGETS = ("cpu", "gpu")
# The settings whose defaults depend on where the model runs (measured with `make bench`, see docs/load-tests.md).
# CPU: two instances side by side, Triton's own default for ONNX Runtime models, serve more under load than one
# on every core. Batches form from whatever is queued, at once (Triton's recommended starting point): batching
# saves next to nothing per image on a CPU, and with preferred sizes a burst of four requests became one batch
# on one instance while the other idled. GPU: one instance per device, waiting briefly for batches of 4 or 8.
TARGET_DEFAULTS = {
    "cpu": {"instance_count": 2, "preferred_batch_sizes": (), "max_queue_delay_us": 0},
    "gpu": {"instance_count": 1, "preferred_batch_sizes": (4, 8), "max_queue_delay_us": 2000},
}


@dataclass(frozen=True)
class PublishSettings:
    max_batch_size: int = 32
    # None here and for instance_count: the target's value in TARGET_DEFAULTS.
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int = 64
    # Off: Triton hands the model one request per execution (what batching buys is measured with this).
    dynamic_batching: bool = True
    instance_count: int | None = None
    # CPU target. 0: the serving machine's cores divided among the instances, worked out where Triton runs.
    intra_op_threads: int = 0
    # ONNX Runtime's idle threads busy-wait by default. Off: on a CPU that Triton shares with the gateway
    # (and its stub processes), spinning cost throughput and caused rare 0.5 s stalls in `make bench`.
    intra_op_spinning: bool = False
    target: str = "cpu"  # "cpu": Python backend + ONNX Runtime; "gpu": ONNX Runtime backend + TensorRT
    keep: int | None = None  # after publishing, remove all but the newest `keep` versions
    version_policy: str = "latest"  # Triton serves the newest `latest_versions`, or "all"
    latest_versions: int = 1
    trt_fp16: bool = True
    trt_cache_path: str | None = None  # default: DEFAULT_TRT_CACHE_ROOT/<name>
    cuda_graphs: bool = True  # for TensorRT plans (the backend that supports them)
    triton_url: str | None = None  # HTTP endpoint of a server in explicit model-control mode
    triton_release: str = DEFAULT_TRITON_RELEASE
    # The model takes N x H x W x C uint8 pixels and normalizes them itself (builder.pixel_input).
    pixel_input: bool = False
    # TensorRT plans: the serving GPUs' compute capability ("8.9"); None: this machine's GPU.
    compute_capability: str | None = None
    # Start a canary rollout of the new version with this share of requests (builder rollout); None: serve
    # it as the version policy says.
    canary_percent: float | None = None
    # Triton runs a few of the model's validation images through every instance before READY (model_warmup).
    warmup: bool = True
    # Refuse a version whose recorded top-1 is this many points below the serving version's, unless `force`.
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    force: bool = False
    # "gpu": also a DALI preprocessing model and an ensemble taking encoded images (builder.dali_preprocess).
    preprocess: str = "cpu"
    # Whether the preferred batch sizes are the target's defaults (fitted to the max batch) or were asked for.
    preferred_batch_sizes_given: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PublishError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.keep is not None and self.keep < 1:
            raise PublishError(f"--keep {self.keep}: keep at least 1 version")
        if self.canary_percent is not None and not 0 <= self.canary_percent <= 100:
            raise PublishError(f"--canary {self.canary_percent}: a percentage from 0 to 100")
        if self.canary_percent is not None and self.keep is not None and self.keep < 2:
            raise PublishError(f"--keep {self.keep} with --canary would remove the stable version: keep 2 or more")
        object.__setattr__(self, "preferred_batch_sizes_given", self.preferred_batch_sizes is not None)
        for key, value in TARGET_DEFAULTS[self.target].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        object.__setattr__(
            self,
            "preferred_batch_sizes",
            fit_preferred_batch_sizes(
                self.preferred_batch_sizes, self.max_batch_size, self.preferred_batch_sizes_given, "--max-batch-size"
            ),
        )
        if self.instance_count < 1:
            raise PublishError(f"instance_count {self.instance_count}: at least 1 instance")
        if self.intra_op_threads < 0:
            raise PublishError(f"intra_op_threads {self.intra_op_threads}: 0 (share the cores) or more")
        if self.preprocess not in dali_preprocess.PREPROCESS_CHOICES:
            raise PublishError(f"--preprocess {self.preprocess!r} is not one of cpu, gpu")
        if self.triton_release not in TRITON_TENSORRT:
            raise PublishError(f"Triton release {self.triton_release!r} is not one of {', '.join(TRITON_TENSORRT)}")
        if not (isinstance(self.max_accuracy_drop, (int, float)) and math.isfinite(self.max_accuracy_drop)) or (
            self.max_accuracy_drop < 0
        ):
            raise PublishError(f"max_accuracy_drop {self.max_accuracy_drop!r}: top-1 points, 0 or more")


def fit_preferred_batch_sizes(sizes, max_batch: int, given: bool, limit: str) -> tuple[int, ...]:
    """The target's default sizes that fit under `max_batch`; sizes asked for must all fit, or PublishError."""
    sizes = tuple(sizes)
    too_big = [size for size in sizes if size > max_batch]
    if too_big and given:
        raise PublishError(f"preferred batch sizes {too_big} exceed {limit} {max_batch}")
    return tuple(size for size in sizes if size <= max_batch)


@dataclass(frozen=True)
class OnnxClassifier:
    """What publish needs to know about an ONNX image classifier."""

    input_name: str
    input_dims: tuple[int, ...]  # without the batch axis
    output_names: tuple[str, ...]
    num_classes: int
    metadata: dict[str, str]
    # The batch axis: None where it is dynamic, else the only batch size the graph accepts.
    batch_size: int | None = None


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
    proto = load_onnx(path)
    try:
        # By path, so that weights stored beside the file (torch.onnx.export's default) are found.
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError and others for graphs it cannot accept
        raise PublishError(f"{path} is not a valid ONNX model: {error_line(e)}") from e
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
        metadata=metadata_of(proto),
        # A dim_value of 0 is how some exporters write an unknown size.
        batch_size=input_dims[0] or None,
    )


def _check_batch_axis(model: OnnxClassifier) -> bool:
    """True where Triton may batch requests; a fixed batch of 1 is served one image per call."""
    if model.batch_size is None:
        return True
    if model.batch_size == 1:
        return False
    raise PublishError(
        f"input {model.input_name!r} has a fixed batch of {model.batch_size}; export the model with a dynamic "
        f"batch axis (builder export does; with torch.onnx.export, dynamic_shapes=({{0: 'batch'}},), or "
        f"dynamic_axes={{{model.input_name!r}: {{0: 'batch'}}, ...}} for the input and every output with "
        f"dynamo=False)"
    )


def _next_version(model_dir: Path) -> int:
    versions = (
        [int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()] if model_dir.exists() else []
    )
    return max(versions, default=0) + 1


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_config(
    name: str,
    model: OnnxClassifier,
    spec: PreprocessSpec,
    labels: Sequence[str],
    settings: PublishSettings,
    int8: bool = False,
) -> model_config.ModelConfig:
    """The model's config; `int8` (GPU target): the model is INT8 Q/DQ in TensorRT's form."""
    parameters = {
        **spec.to_parameters(),
        LABELS_PARAMETER: json.dumps(list(labels)),
        **decode_parameters(model.metadata),
    }
    if settings.target == "cpu":
        parameters["onnxruntime.intra_op_threads"] = str(settings.intra_op_threads)
        parameters["onnxruntime.allow_spinning"] = "1" if settings.intra_op_spinning else "0"
    gpu = settings.target == "gpu"
    batching = _check_batch_axis(model)
    # Without batching Triton's dims include the batch axis, and the gateway sends one image per call.
    batch_axis = () if batching else (model.batch_size,)
    if settings.pixel_input:
        model_input = model_config.TensorSpec(
            model.input_name, (*batch_axis, spec.image_size, spec.image_size, spec.channels), data_type=PIXEL_DATATYPE
        )
    else:
        model_input = model_config.TensorSpec(model.input_name, (*batch_axis, *model.input_dims))
    return model_config.ModelConfig(
        name=name,
        inputs=(model_input,),
        outputs=tuple(
            model_config.TensorSpec(
                out, (*batch_axis, model.num_classes), label_filename="labels.txt" if i == 0 else None
            )
            for i, out in enumerate(model.output_names)
        ),
        backend="onnxruntime" if gpu else "python",
        platform="onnxruntime_onnx" if gpu else "",
        max_batch_size=settings.max_batch_size if batching else 0,
        # Without batching the dynamic batcher is only the bounded queue (Triton 2.51 keeps it, tested).
        dynamic_batching=model_config.DynamicBatching(
            preferred_batch_sizes=settings.preferred_batch_sizes if batching else (),
            max_queue_delay_us=settings.max_queue_delay_us if batching else 0,
            max_queue_size=settings.max_queue_size,
        )
        if settings.dynamic_batching
        else None,
        instance_count=settings.instance_count,
        instance_kind="KIND_GPU" if gpu else "KIND_CPU",
        version_policy=settings.version_policy,
        latest_versions=settings.latest_versions,
        parameters=parameters,
        gpu_accelerators=(tensorrt_accelerator(name, settings, model_input, batching, int8),) if gpu else (),
    )


def decode_parameters(metadata: Mapping[str, str]) -> dict[str, str]:
    """The gateway's decoding of the model's JPEGs, from `builder evaluate --gateway-decode`'s measurement
    in the ONNX metadata: whether reduced scale is allowed (top-1 within the budget), and the two top-1s.
    Nothing for a model never measured so: the gateway then decodes it exactly."""
    if DECODE_METADATA not in metadata:
        return {}
    try:
        recorded = json.loads(metadata[DECODE_METADATA])
        allowed = recorded["reduced_scale"]
        if not isinstance(allowed, bool):
            raise ValueError(f"reduced_scale is {allowed!r}, not true or false")
        exact, reduced = float(recorded["exact_top1"]), float(recorded["reduced_top1"])
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(
            f"the model's {DECODE_METADATA!r} metadata is malformed ({error_line(e)}); "
            "measure it again with `builder evaluate --gateway-decode`"
        ) from e
    return {
        REDUCED_SCALE_PARAMETER: "true" if allowed else "false",
        "decode.exact_top1": f"{exact:.4f}",
        "decode.reduced_top1": f"{reduced:.4f}",
    }


def tensorrt_accelerator(
    name: str,
    settings: PublishSettings,
    model_input: model_config.TensorSpec,
    batching: bool = True,
    int8: bool = False,
) -> model_config.ExecutionAccelerator:
    """ONNX Runtime's TensorRT provider: the engine is built on the serving GPU at load time, then cached.

    Keys as Triton 24.10's ONNX Runtime backend forwards them (its README's parameter table; it refuses
    any other key). The engine cache is told apart per version by the graph name publish() gives the
    model, not here: config.pbtxt is one for all versions, and a trt_engine_cache_prefix would replace
    the graph name in the engine's file name.
    """
    # The backend turns precision_mode into exactly one of trt_fp16_enable or trt_int8_enable (r24.10
    # src/onnxruntime.cc), so an INT8 model gets no FP16 fallback: layers outside its Q/DQ run in FP32. Q/DQ
    # models take no calibration table (its README: with one, ONNX Runtime refuses to create the session).
    precision = "INT8" if int8 else "FP16" if settings.trt_fp16 else "FP32"
    parameters = {
        "precision_mode": precision,
        "trt_engine_cache_enable": "true",
        # ONNX Runtime creates only this last folder: the root must exist where Triton runs (a mounted volume).
        "trt_engine_cache_path": settings.trt_cache_path or f"{DEFAULT_TRT_CACHE_ROOT}/{name}",
    }
    # Without batching every dimension of the input is fixed (the batch of 1 is in its dims): there is no
    # range for a profile to give, and ONNX Runtime builds the engine for that one shape when the session
    # is created. A profile here would name a shape of the wrong rank.
    if batching and settings.max_batch_size > 0:
        # One explicit profile, so the engine is built while the model loads, for every batch Triton may
        # send, instead of at the first request and again each time a larger batch arrives.
        # Format "name:DxDxD" (several inputs would be comma-separated).
        opt = max(settings.preferred_batch_sizes, default=settings.max_batch_size)
        shape = "x".join(str(d) for d in model_input.dims)
        for key, batch in (("min", 1), ("opt", opt), ("max", settings.max_batch_size)):
            parameters[f"trt_profile_{key}_shapes"] = f"{model_input.name}:{batch}x{shape}"
    return model_config.ExecutionAccelerator("tensorrt", parameters)


def resolve_interface(
    onnx_path: Path,
    spec: PreprocessSpec | None,
    labels: Sequence[str] | None,
) -> tuple[OnnxClassifier, PreprocessSpec, list[str]]:
    """The model's tensors, preprocessing and labels: given ones win over the file's metadata."""
    model = inspect_onnx(onnx_path)
    embedded = OnnxMeta.from_props(model.metadata, source=onnx_path)
    if spec is None:
        if embedded.preprocess is None:
            raise PublishError(f"{onnx_path} carries no preprocessing spec; give the preprocessing flags")
        spec = embedded.preprocess
    if labels is None:
        labels = embedded.classes if "labels" in embedded.props else [str(i) for i in range(model.num_classes)]
    if len(labels) != model.num_classes:
        raise PublishError(f"{len(labels)} labels given for a model with {model.num_classes} classes")
    if tuple(model.input_dims) != spec.input_shape:
        raise PublishError(f"model input is {model.input_dims} but the preprocessing makes {spec.input_shape}")
    return model, spec, list(labels)


def _check_name(name: str) -> None:
    if not MODEL_NAME.match(name):
        raise PublishError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 64)")


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
    _check_name(name)
    model, spec, labels = resolve_interface(onnx_path, spec, labels)
    int8 = settings.target == "gpu" and _is_tensorrt_int8(Path(onnx_path))
    config = build_config(name, model, spec, labels, settings, int8)
    if settings.preprocess == "gpu":
        dali_preprocess.check_applicable(
            spec,
            pixel_input=settings.pixel_input,
            batching=config.max_batch_size > 0,
            canary=settings.canary_percent is not None,
        )
        for extra in dali_preprocess.model_names(name):
            _check_name(extra)
        dali_preprocess.check_destinations(Path(repository), name)
    config, warmup_files, warmup_data = with_warmup(config, model.metadata, spec, settings)
    lineage = {
        "source_onnx": str(Path(onnx_path).resolve()),
        "onnx_metadata": model.metadata,
        "val_accuracy": recorded_accuracy(model.metadata),
        "warmup": warmup_data,
        "target": settings.target,
        "pixel_input": settings.pixel_input,
    }
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        onnx_path = _self_contained(Path(onnx_path), Path(tmp) / "inline.onnx")
        if settings.pixel_input:
            onnx_path = add_pixel_input(Path(onnx_path), spec, Path(tmp) / "model.onnx")
        if settings.target == "gpu":
            onnx_path = name_graph_after_weights(Path(onnx_path), Path(tmp) / "model-named.onnx")
            lineage["tensorrt_graph_name"] = onnx.load(str(onnx_path), load_external_data=False).graph.name
        files = {"model.onnx": Path(onnx_path)}
        if settings.target == "cpu":
            files["model.py"] = BACKEND_MODEL
        if settings.preprocess != "gpu":
            return _publish_files(files, Path(repository), name, config, labels, lineage, settings, warmup_files)
        # Three models or none: where a companion still fails to write, what this publish wrote is undone.
        model_dirs = [Path(repository) / n for n in (name, *dali_preprocess.model_names(name))]
        before = [_ModelFolderState.of(d) for d in model_dirs]
        try:
            published = _publish_files(files, Path(repository), name, config, labels, lineage, settings, warmup_files)
            _publish_gpu_preprocessing(Path(repository), config, spec, labels, lineage, settings, Path(tmp))
        except BaseException:
            for state in before:
                state.restore()
            raise
        if dali_preprocess.local_stack_lacks_dali(Path(repository)):
            log.warning(
                "the local stack serves %s with a Triton that has no DALI backend: %s and %s will fail to load "
                "there (the classifier serves on)",
                repository,
                *dali_preprocess.model_names(name),
            )
        return published


@dataclasses.dataclass(frozen=True)
class _ModelFolderState:
    """A model folder's versions and config files before a publish, to put back if the publish fails."""

    model_dir: Path
    existed: bool
    versions: frozenset[int]
    texts: Mapping[str, str]

    @classmethod
    def of(cls, model_dir: Path) -> _ModelFolderState:
        texts = {}
        for file_name in ("config.pbtxt", "labels.txt"):
            if (model_dir / file_name).is_file():
                texts[file_name] = (model_dir / file_name).read_text()
        return cls(model_dir, model_dir.exists(), frozenset(versions(model_dir)), texts)

    def restore(self) -> None:
        if not self.existed:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            return
        for version in set(versions(self.model_dir)) - self.versions:
            shutil.rmtree(self.model_dir / str(version), ignore_errors=True)
        for file_name, text in self.texts.items():
            try:
                _write_atomic(self.model_dir / file_name, text)
            except OSError:
                pass  # nothing more to do: the error that made this publish fail is what is reported


def _publish_gpu_preprocessing(
    repository: Path,
    classifier: model_config.ModelConfig,
    spec: PreprocessSpec,
    labels: Sequence[str],
    lineage: dict,
    settings: PublishSettings,
    tmp: Path,
) -> None:
    """The DALI preprocessing model and the ensemble beside the classifier just published (builder.dali_preprocess)."""
    preprocess_name, ensemble_name = dali_preprocess.model_names(classifier.name)
    preprocess = dali_preprocess.preprocess_config(
        preprocess_name, spec, classifier.max_batch_size, classifier.dynamic_batching
    )
    ensemble = dali_preprocess.ensemble_config(
        ensemble_name, classifier, preprocess_name, spec, labels, _interface_parameters(classifier)
    )
    files = {
        "dali.py": dali_preprocess.DALI_MODEL,
        dali_preprocess.SPEC_FILE: dali_preprocess.write_spec(spec, tmp / dali_preprocess.SPEC_FILE),
    }
    lineage = {**lineage, "classifier": classifier.name}
    try:
        for model_name, config, model_files in ((preprocess_name, preprocess, files), (ensemble_name, ensemble, {})):
            published = _write_version(model_files, repository, model_name, config, labels, lineage, {})
            if settings.keep:
                remove_old_versions(published.model_dir, settings.keep)
    except OSError as e:
        raise PublishError(f"cannot write to model repository {repository}: {e.strerror or e}") from e


def _is_tensorrt_int8(onnx_path: Path) -> bool:
    """Whether a model for the GPU is INT8 Q/DQ (explicit quantization); PublishError for Q/DQ that TensorRT
    cannot parse (ONNX Runtime's uint8 QDQ for the CPU)."""
    proto = load_onnx(onnx_path)
    if not any(node.op_type in QDQ_OPS for node in proto.graph.node):
        return False
    if any(uses_external_data(t) for t in proto.graph.initializer):  # zero points may be stored beside it
        load_external_data_for_model(proto, str(onnx_path.parent))
    problems = qdq_problems(proto)
    if problems:
        raise PublishError(
            f"{onnx_path} is not INT8 Q/DQ in TensorRT's form (int8, zero point 0): {problems[0]}; publish it "
            f"with --target cpu, or for the GPU quantize the float model with `builder quantize --target gpu`"
        )
    return True


def name_graph_after_weights(onnx_path: Path, output: Path) -> Path:
    """The model saved with its graph named after a hash of its bytes (weights included).

    ONNX Runtime's TensorRT provider names a cached engine by the graph name and a hash (TRTGenerateId,
    tensorrt_execution_provider_utils.h) of the model's file name, its tensor names and the software
    versions, not of its weights. Every version is a `model.onnx` with the same tensor names when the
    architecture is the same, so without this a new version would load the engine of the old weights
    from the model's cache folder. The same bytes published again keep the name, and reuse their engine.
    """
    model = onnx.load(str(onnx_path))  # external weights included: the published file holds them all
    model.graph.name = f"sha256_{onnx_sha256(onnx_path)[:32]}"
    onnx.save(model, str(output))
    return output


def _serving_compute_capability(settings: PublishSettings) -> str:
    if settings.compute_capability:
        return settings.compute_capability
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except ImportError:
        pass
    raise PublishError(
        "no GPU is visible here to compare the plan's compute capability with: give the serving "
        "GPUs' with --compute-capability (nvidia-smi --query-gpu=compute_cap --format=csv,noheader)"
    )


def _check_plan(plan_path: Path, onnx_path: Path, info: dict, settings: PublishSettings) -> int:
    """Refuse a plan that would not load or not answer in Triton; returns the max batch it is published with."""
    if info.get("plan_sha256") != file_sha256(plan_path):
        raise PublishError(
            f"the record beside {plan_path} does not describe it (another build's, or from before "
            f"plans were hashed): rebuild the engine with `builder engine`"
        )
    built_for, serving = str(info.get("compute_capability", "unknown")), _serving_compute_capability(settings)
    if built_for != serving:
        # An engine is specific to the GPU generation it was built on; Triton fails to deserialize it elsewhere.
        raise PublishError(
            f"{plan_path} was built for compute capability {built_for} but the serving GPU has "
            f"{serving}: build the engine on the serving GPU, or publish the ONNX model with "
            "--target gpu"
        )
    min_batch = int(info.get("min_batch", 1))
    if min_batch != 1:
        # Triton's TensorRT backend refuses a batch outside the profile; a request alone is a batch of 1.
        raise PublishError(
            f"{plan_path}'s optimization profile starts at batch {min_batch}, so a request "
            "Triton runs alone would fail: rebuild it with `builder engine --min-batch 1`"
        )
    if info.get("source_onnx_sha256") != onnx_sha256(onnx_path):
        raise PublishError(
            f"{plan_path} was not built from {onnx_path} (its record names another model): give "
            f"--onnx the file the engine was built from, or rebuild the engine from this one"
        )
    max_batch = min(settings.max_batch_size, int(info.get("max_batch", settings.max_batch_size)))
    fit_preferred_batch_sizes(
        settings.preferred_batch_sizes, max_batch, settings.preferred_batch_sizes_given, "the plan's max batch"
    )
    return max_batch


def _self_contained(path: Path, inline: Path) -> Path:
    """`path`, or where its weights live in another file (torch.onnx.export's default), a copy at `inline`
    with them inside: a version folder holds model.onnx alone."""
    proto = onnx.load(str(path), load_external_data=False)
    if not any(uses_external_data(t) for t in proto.graph.initializer):
        return path
    onnx.save(onnx.load(str(path)), str(inline))
    return inline


def publish_plan(
    plan_path: Path,
    onnx_path: Path,
    repository: Path,
    name: str,
    *,
    spec: PreprocessSpec | None = None,
    labels: Sequence[str] | None = None,
    settings: PublishSettings = PublishSettings(target="gpu"),
) -> PublishedVersion:
    """Publish a TensorRT engine for Triton's TensorRT backend; `onnx_path` is the model it was built from.

    Refused unless the TensorRT version recorded beside the plan is the one the target Triton loads.
    """
    _check_name(name)
    if settings.target != "gpu":
        raise PublishError("a TensorRT plan runs only on a GPU: publish it with --target gpu")
    if settings.preprocess == "gpu":
        raise PublishError("--preprocess gpu is for ONNX models: publish the plan without it, or the ONNX model")
    if settings.pixel_input:
        raise PublishError(
            "a TensorRT plan keeps the float input it was built with; publish it without "
            "--pixel-input, or publish the ONNX model with --target gpu --pixel-input"
        )
    info = read_engine_info(plan_path)
    wanted = TRITON_TENSORRT[settings.triton_release]
    built = ".".join(str(info.get("tensorrt_version", "unknown")).split(".")[:2])
    if built != wanted:
        raise PublishError(
            f"{plan_path} was built with TensorRT {info.get('tensorrt_version', 'unknown')} but Triton "
            f"{settings.triton_release} loads TensorRT {wanted}; rebuild the engine with TensorRT {wanted} "
            f"(e.g. inside nvcr.io/nvidia/tritonserver:{settings.triton_release}-py3) or publish the ONNX "
            f"model with --target gpu"
        )
    model, spec, labels = resolve_interface(onnx_path, spec, labels)
    max_batch = _check_plan(Path(plan_path), Path(onnx_path), info, settings)
    gpu_onnx = build_config(name, model, spec, labels, settings)
    batching = gpu_onnx.dynamic_batching and dataclasses.replace(
        gpu_onnx.dynamic_batching,
        preferred_batch_sizes=fit_preferred_batch_sizes(settings.preferred_batch_sizes, max_batch, False, ""),
    )
    config = dataclasses.replace(
        gpu_onnx,
        backend="tensorrt",
        platform="tensorrt_plan",
        gpu_accelerators=(),
        max_batch_size=max_batch,
        dynamic_batching=batching,
        cuda_graphs=settings.cuda_graphs,
    )
    config, warmup_files, warmup_data = with_warmup(config, model.metadata, spec, settings)
    lineage = {
        "source_onnx": str(Path(onnx_path).resolve()),
        "engine": info,
        "val_accuracy": recorded_accuracy(model.metadata),
        "warmup": warmup_data,
        "target": "gpu",
    }
    return _publish_files(
        {"model.plan": Path(plan_path)}, Path(repository), name, config, labels, lineage, settings, warmup_files
    )


def recorded_accuracy(metadata: Mapping[str, str]) -> float | None:
    """Top-1 on the run's validation split as an exported file records it (a fraction): QAT's measurement of
    the fake-quantized model where there is one, else the checkpoint's. None when the file records none."""
    candidates = []
    try:
        candidates.append(json.loads(metadata.get("qat") or "{}").get("val_accuracy"))
    except (ValueError, AttributeError):
        pass
    candidates.append(metadata.get("val_accuracy"))
    for value in candidates:
        try:
            accuracy = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if 0.0 <= accuracy <= 1.0:
            return accuracy
    return None


def _serving_version(model_dir: Path) -> int | None:
    """The version the model is served by: during a rollout its stable version (the canary is on trial), else
    the highest one, or the highest of a specific policy."""
    existing = versions(model_dir)
    try:
        config = model_config.parse((model_dir / "config.pbtxt").read_text())
    except Exception:  # no config, or one that cannot be read: the newest folder is what Triton would load
        config = None
    if config is not None:
        try:
            rollout = model_config.rollout_of(config)
        except BuilderError:
            rollout = None
        if rollout is not None and rollout.stable in existing:
            return rollout.stable
    pinned = config.specific_versions if config is not None else ()
    chosen = [v for v in existing if v in pinned] or existing
    return chosen[-1] if chosen else None


def _version_accuracy(version_dir: Path) -> float | None:
    try:
        lineage = json.loads((version_dir / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(lineage, dict):
        return None
    if "val_accuracy" in lineage:
        value = lineage["val_accuracy"]
        return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None
    # Published before the accuracy was recorded beside the metadata.
    metadata = lineage.get("onnx_metadata")
    return recorded_accuracy(metadata) if isinstance(metadata, dict) else None


def _warn_of_a_rollout_ended(model_dir: Path) -> None:
    """A plain publish writes a config without the rollout under way: say which one it ends."""
    if not (model_dir / "config.pbtxt").exists():
        return
    try:
        rollout = model_config.rollout_of(model_config.read_config(model_dir))
    except BuilderError:
        return  # a config that cannot be read is replaced, as before
    if rollout is not None:
        log.warning(
            "this publish ends the rollout of version %d (%g%%) beside version %d of %s: the new version "
            "replaces both (publish --canary starts a rollout of it instead)",
            rollout.canary,
            rollout.canary_percent,
            rollout.stable,
            model_dir.name,
        )


def check_accuracy(model_dir: Path, new_accuracy: float | None, settings: PublishSettings) -> None:
    """Refuse a version whose recorded top-1 is more than the budget below the serving version's."""
    serving = _serving_version(model_dir)
    if serving is None:
        return
    old_accuracy = _version_accuracy(model_dir / str(serving))
    if new_accuracy is None or old_accuracy is None:
        which = "this model" if new_accuracy is None else f"version {serving} of {model_dir.name}"
        log.warning(
            "%s records no validation accuracy (exported elsewhere?): publishing without comparing it "
            "with the serving version",
            which,
        )
        return
    drop = 100 * (old_accuracy - new_accuracy)
    if drop <= settings.max_accuracy_drop:
        return
    what = (
        f"this model's recorded top-1 is {100 * new_accuracy:.2f}%, {drop:.2f} points below the "
        f"{100 * old_accuracy:.2f}% of version {serving} of {model_dir.name}"
    )
    if settings.force:
        log.warning("%s; publishing it anyway (--force)", what)
        return
    if settings.canary_percent is not None:
        # A canary replaces nothing: it serves its share beside the better version, which stays.
        log.warning("%s; publishing it as a %g%% canary beside it", what, settings.canary_percent)
        return
    raise PublishError(
        f"{what}, over the budget of {settings.max_accuracy_drop:g} (--max-accuracy-drop): nothing was "
        "published; give --force to replace it anyway"
    )


def warmup_images(metadata: Mapping[str, str], spec: PreprocessSpec, pixel_input: bool) -> tuple[list, str]:
    """Up to WARMUP_IMAGES validation images of the model's dataset, as the gateway sends them to the model,
    and where they came from; no images and why where the dataset is not at hand."""
    props = OnnxMeta.from_props(metadata)
    if not props.has_dataset:
        return [], "the model names no dataset (exported elsewhere?)"
    try:
        from .data import load_run_dataset  # torch, which publishing does without otherwise

        dataset = load_run_dataset(props.dataset_recipe)
        count = min(WARMUP_IMAGES, len(dataset.val))
        images = [
            model_input(dataset.val.image(i, dataset.color_mode), spec, pixel_input=pixel_input) for i in range(count)
        ]
    except (BuilderError, OSError, ImportError) as e:
        return [], f"its dataset {props.dataset_recipe['source']!r} is not at hand: {error_line(e)}"
    if not images:
        return [], f"its dataset {props.dataset_recipe['source']!r} has no validation images"
    return images, f"{len(images)} validation images of {props.dataset_recipe['source']!r}"


def with_warmup(
    config: model_config.ModelConfig, metadata: Mapping[str, str], spec: PreprocessSpec, settings: PublishSettings
) -> tuple[model_config.ModelConfig, dict[str, bytes], str]:
    """The config with `model_warmup` samples, the raw files they read, and what the data is.

    Each image is a sample of batch 1, and the first is also run at the largest preferred batch (Triton runs
    a sample's `batch_size` requests as one batch), so the sizes the batcher forms are warm before READY.
    """
    if not settings.warmup:
        return config, {}, "none"
    tensor = config.inputs[0]
    images, source = warmup_images(metadata, spec, settings.pixel_input)
    batches = [1]
    if config.max_batch_size > 0 and config.dynamic_batching and config.dynamic_batching.preferred_batch_sizes:
        batches.append(max(config.dynamic_batching.preferred_batch_sizes))
    files: dict[str, bytes] = {}
    inputs = []
    for image in images:
        data = np.ascontiguousarray(image, dtype=np.uint8 if tensor.data_type == "UINT8" else np.float32).tobytes()
        file_name = f"{hashlib.sha256(data).hexdigest()[:32]}.raw"
        files[file_name] = data
        inputs.append(model_config.WarmupInput(tensor.data_type, tensor.dims, data_file=file_name))
    if not inputs:
        # Random bytes as floats may be NaN or huge, which some kernels take slow paths for; zeros are the
        # dataset's mean color once normalized.
        synthetic = "random_data" if tensor.data_type == "UINT8" else "zero_data"
        log.warning("no images to warm %s up with (%s): Triton warms it with %s", config.name, source, synthetic)
        source = f"{synthetic}: {source}"
        inputs.append(model_config.WarmupInput(tensor.data_type, tensor.dims, synthetic=synthetic))
    samples = [
        model_config.WarmupSample(f"image{i}_batch1", 1, {tensor.name: warmup_input})
        for i, warmup_input in enumerate(inputs)
    ]
    samples += [
        model_config.WarmupSample(f"image0_batch{batch}", batch, {tensor.name: inputs[0]})
        for batch in sorted(set(batches))
        if batch > 1
    ]
    return dataclasses.replace(config, warmup=tuple(samples)), files, source


def _interface_parameters(config: model_config.ModelConfig) -> dict[str, str]:
    """The parameters every served version of a model is preprocessed and labelled by."""
    return {k: v for k, v in config.parameters.items() if k.startswith(PARAMETER_PREFIX) or k == LABELS_PARAMETER}


def _check_shared_interface(model_dir: Path, config: model_config.ModelConfig, canary: bool = False) -> None:
    """Triton keeps one config, so one preprocessing spec and one label list, per model. Where the new
    config serves older versions beside the new one, they would be preprocessed and labelled as the new
    one is: wrong answers, without an error. Refused unless the two agree."""
    serves_several = config.version_policy != "latest" or config.latest_versions > 1
    existing = model_dir / "config.pbtxt"
    if not serves_several or not versions(model_dir) or not existing.is_file():
        return
    try:
        served = model_config.parse(existing.read_text())
    except Exception:  # an unreadable config is replaced, as before
        return
    changed = sorted(
        k
        for k in _interface_parameters(served).keys() | _interface_parameters(config).keys()
        if _interface_parameters(served).get(k) != _interface_parameters(config).get(k)
    )
    if changed:
        what = "labels" if changed == [LABELS_PARAMETER] else "preprocessing or labels"
        if canary:
            raise PublishError(
                f"a canary is served beside the version of {model_dir.name} served now, and the two share one "
                f"config: this version's {what} differ ({', '.join(changed)}); publish it under another name"
            )
        raise PublishError(
            f"model {model_dir.name} would serve its older versions beside this one (version policy "
            f"{config.version_policy}), and they share one config: this version's {what} differ "
            f"({', '.join(changed)}); publish it under another name, or with --version-policy latest"
        )


def _keep_model_settings(model_dir: Path, config: model_config.ModelConfig) -> model_config.ModelConfig:
    """A new version keeps the model's degradation setting (`builder degrade`) and its reference model
    (`builder rollout --reference`, `builder build`): they belong to the model, not to a version."""
    try:
        served = model_config.parse((model_dir / "config.pbtxt").read_text())
    except Exception:  # no config yet, or one that cannot be read: nothing to keep
        return config
    kept = {k: v for k, v in served.parameters.items() if k.startswith((DEGRADE_PREFIX, REFERENCE_PREFIX))}
    return dataclasses.replace(config, parameters={**config.parameters, **kept}) if kept else config


def _publish_files(
    files: dict[str, Path],
    repository: Path,
    name: str,
    config: model_config.ModelConfig,
    labels: Sequence[str],
    lineage: dict,
    settings: PublishSettings,
    warmup_files: Mapping[str, bytes] | None = None,
) -> PublishedVersion:
    canary = None
    config = _keep_model_settings(Path(repository) / name, config)
    if settings.canary_percent is not None:
        # Both versions are served with this config: they must agree on preprocessing and labels. A canary
        # replaces nothing: a worse one is published with a warning (the rollout compares the two live).
        _check_shared_interface(Path(repository) / name, dataclasses.replace(config, version_policy="all"), canary=True)
        check_accuracy(Path(repository) / name, lineage.get("val_accuracy"), settings)
        canary = (model_config.pin_served_version(Path(repository) / name), settings.canary_percent)
    else:
        _check_shared_interface(Path(repository) / name, config)
        check_accuracy(Path(repository) / name, lineage.get("val_accuracy"), settings)
        _warn_of_a_rollout_ended(Path(repository) / name)
    try:
        repository.mkdir(parents=True, exist_ok=True)
        published = _write_version(files, repository, name, config, labels, lineage, warmup_files or {}, canary)
        if settings.keep:
            remove_old_versions(published.model_dir, settings.keep)
    except OSError as e:
        raise PublishError(f"cannot write to model repository {repository}: {e.strerror or e}") from e
    if settings.triton_url:
        load_in_triton(settings.triton_url, name, published.version)
    return published


def versions(model_dir: Path) -> list[int]:
    if not model_dir.exists():
        return []
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def remove_old_versions(model_dir: Path, keep: int) -> list[int]:
    """Remove all but the newest `keep` versions; each is first renamed out of Triton's sight."""
    removed = versions(model_dir)[:-keep]
    for version in removed:
        # A non-numeric folder is not a version to Triton: after the rename it is gone at once,
        # even if deleting the files takes a while or fails halfway.
        hidden = Path(tempfile.mkdtemp(prefix=f".removing-{version}-", dir=model_dir))
        os.rename(model_dir / str(version), hidden / "version")
        shutil.rmtree(hidden, ignore_errors=True)
    return removed


def load_in_triton(url: str, name: str, version: int) -> None:
    """Ask a server in explicit model-control mode to (re)load `name`; polling servers find it themselves."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from server.triton import REPOSITORY_KEY_HEADER
    from stack.settings import TritonSettings
    from stack.supervisor import triton_api_key

    address = url.removeprefix("http://")
    # The local stack restricts Triton's repository and inference APIs to callers with its key.
    key = triton_api_key(TritonSettings())
    headers = {REPOSITORY_KEY_HEADER: key} if key else None
    try:
        client = httpclient.InferenceServerClient(address, connection_timeout=10, network_timeout=120)
        client.load_model(name, headers=headers)
        if not client.is_model_ready(name, str(version), headers=headers):
            raise PublishError(f"Triton at {url} loaded {name} but version {version} is not ready; see its log")
    except InferenceServerException as e:
        if "polling is enabled" in str(e):
            return  # poll mode: the server picks the new version up on its next scan
        raise PublishError(
            f"version {version} of {name} is published, but Triton at {url} could not load it: {e.message() or e}"
        ) from e
    except ConnectionError as e:
        raise PublishError(f"version {version} of {name} is published, but Triton at {url} is unreachable") from e


def _write_warmup_files(model_dir: Path, warmup_files: Mapping[str, bytes]) -> None:
    """The raw inputs the config's warmup samples name. Named after their bytes, so that the files an older
    config names stay as they are while Triton may still load with it."""
    if not warmup_files:
        return
    folder = model_dir / WARMUP_DIR
    folder.mkdir(exist_ok=True)
    for file_name, data in warmup_files.items():
        if (folder / file_name).is_file():
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / file_name)


def _stage_version(version_dir: Path, files: dict[str, Path], lineage: dict) -> None:
    version_dir.mkdir(exist_ok=True)
    for target, source in files.items():
        shutil.copy2(source, version_dir / target)
    (version_dir / "build.json").write_text(json.dumps(lineage, indent=2, default=str))


def _write_version(
    files: dict[str, Path],
    repository: Path,
    name: str,
    config: model_config.ModelConfig,
    labels: Sequence[str],
    lineage: dict,
    warmup_files: Mapping[str, bytes],
    canary: tuple[int, float] | None = None,
) -> PublishedVersion:
    """`canary`: (stable version, percent) to start a rollout of the new version with."""
    model_dir = repository / name
    version = _next_version(model_dir)
    lineage = {
        "name": name,
        "version": version,
        "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **lineage,
        "config": asdict(config),
    }
    config_text, labels_text = model_config.render(config), "\n".join(labels) + "\n"
    if not model_dir.exists() and _publish_new_model(
        model_dir, version, files, lineage, config_text, labels_text, warmup_files
    ):
        return PublishedVersion(model_dir, version)
    # Triton ignores version folders whose names are not numbers, so a new version is staged in a
    # hidden folder of the model and renamed into place complete.
    model_dir.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        _stage_version(staging, files, lineage)
        while True:
            try:
                os.rename(staging, model_dir / str(version))
                break
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            # Another publish took this number since it was picked: the next free one, recorded as such.
            version = lineage["version"] = _next_version(model_dir)
            (staging / "build.json").write_text(json.dumps(lineage, indent=2, default=str))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Before the config that names them.
    _write_warmup_files(model_dir, warmup_files)
    if canary:
        config_text = model_config.render(model_config.with_rollout(config, new_rollout(canary[0], version, canary[1])))
    _write_atomic(model_dir / "labels.txt", labels_text)
    _write_atomic(model_dir / "config.pbtxt", config_text)
    return PublishedVersion(model_dir, version)


def _publish_new_model(
    model_dir: Path,
    version: int,
    files: dict[str, Path],
    lineage: dict,
    config_text: str,
    labels_text: str,
    warmup_files: Mapping[str, bytes],
) -> bool:
    """Stage a whole new model beside the repository and rename it in; False where that cannot be done.

    Triton treats every folder of the repository as a model, hidden ones too, so the staging folder
    must live outside it: in its parent, which is only possible on the same filesystem.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-staging-", dir=model_dir.parent.parent))
    except OSError:
        return False
    try:
        _stage_version(staging / str(version), files, lineage)
        _write_warmup_files(staging, warmup_files)
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
