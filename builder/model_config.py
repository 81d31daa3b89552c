"""Triton `config.pbtxt` from typed objects, through tritonclient's own protobuf classes.

`render()` and `parse()` are inverses, so what publish writes can be read back and checked.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from server.rollout import PARAMETER_PREFIX as ROLLOUT_PREFIX
from server.rollout import Rollout

from .errors import RolloutError

DTYPES = {
    "FP32": pb.TYPE_FP32,
    "FP16": pb.TYPE_FP16,
    "INT8": pb.TYPE_INT8,
    "UINT8": pb.TYPE_UINT8,
    "INT64": pb.TYPE_INT64,
}
# TensorRT engines load only in the TensorRT release they were built with.
TRITON_TENSORRT = {"24.10": "10.5"}
DEFAULT_TRITON_RELEASE = "24.10"
# Inside the serving container; mount a volume there so engines survive restarts.
DEFAULT_TRT_CACHE_ROOT = "/opt/tritonserver/trt_engine_cache"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension
    data_type: str = "FP32"
    label_filename: str | None = None
    # Inputs only: requests of different shapes (encoded images of different lengths) batch together.
    allow_ragged_batch: bool = False


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    # A bounded queue: past it Triton rejects at once, which the gateway turns into a 429.
    max_queue_size: int = 64


@dataclass(frozen=True)
class ExecutionAccelerator:
    """An entry of `optimization.execution_accelerators` (e.g. ONNX Runtime's TensorRT provider)."""

    name: str
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmupInput:
    """One input of a warmup sample (model_config.proto's ModelWarmup.Input): its data comes from a file
    in the model folder's `warmup/` directory (raw bytes of one image, row-major), or is zeros or random."""

    data_type: str
    dims: tuple[int, ...]  # one request's dims, without the batch axis where the model batches
    data_file: str | None = None
    synthetic: str = "zero_data"  # without a file: "zero_data" or "random_data"

    def __post_init__(self) -> None:
        if self.data_file is None and self.synthetic not in ("zero_data", "random_data"):
            raise ValueError(f"warmup data {self.synthetic!r} is not zero_data or random_data")


@dataclass(frozen=True)
class WarmupSample:
    """A `model_warmup` entry: Triton runs `batch_size` requests of it together on every instance, `count`
    times, before the version reports READY."""

    name: str
    batch_size: int
    inputs: Mapping[str, WarmupInput]
    count: int = 1


@dataclass(frozen=True)
class EnsembleStep:
    """A step of `ensemble_scheduling`: which model runs, and its tensors mapped to the ensemble's."""

    model_name: str
    input_map: Mapping[str, str]  # the model's input -> the ensemble tensor it reads
    output_map: Mapping[str, str]  # the model's output -> the ensemble tensor it writes
    model_version: int = -1  # -1: the newest version the model serves


VERSION_POLICIES = ("latest", "all", "specific")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    backend: str = "python"
    platform: str = ""  # e.g. onnxruntime_onnx, tensorrt_plan; empty for the Python backend
    max_batch_size: int = 32
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    version_policy: str = "latest"
    latest_versions: int = 1
    specific_versions: tuple[int, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)
    gpu_accelerators: tuple[ExecutionAccelerator, ...] = ()
    cuda_graphs: bool = False  # honoured by the TensorRT backend
    warmup: tuple[WarmupSample, ...] = ()
    # platform "ensemble": the models a request runs through, in order (Triton's ensemble scheduler).
    ensemble_steps: tuple[EnsembleStep, ...] = ()

    @property
    def is_ensemble(self) -> bool:
        return self.platform == "ensemble"

    def __post_init__(self) -> None:
        if self.version_policy not in VERSION_POLICIES:
            raise ValueError(f"version_policy {self.version_policy!r} is not one of {', '.join(VERSION_POLICIES)}")
        if self.version_policy == "latest" and self.latest_versions < 1:
            raise ValueError("latest_versions must be >= 1")
        if self.version_policy == "specific" and not self.specific_versions:
            raise ValueError("a specific version policy needs specific_versions")
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        # Without batching Triton still runs the dynamic batcher's bounded queue, one request per execution.
        if (
            self.dynamic_batching is not None
            and self.max_batch_size == 0
            and (self.dynamic_batching.preferred_batch_sizes or self.dynamic_batching.max_queue_delay_us)
        ):
            raise ValueError(
                "with max_batch_size 0 dynamic batching is only a queue: preferred batch sizes and "
                "a queue delay need max_batch_size > 0"
            )
        if self.dynamic_batching is not None:
            too_big = [b for b in self.dynamic_batching.preferred_batch_sizes if b > self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred batch sizes {too_big} exceed max_batch_size {self.max_batch_size}")
        if self.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        if self.is_ensemble != bool(self.ensemble_steps) or (self.is_ensemble and self.dynamic_batching):
            raise ValueError("an ensemble, and only an ensemble, has steps; and it has no dynamic batching")
        for sample in self.warmup:
            # Triton skips a sample of batch 0, and runs several requests as one batch only where it batches.
            if not 1 <= sample.batch_size <= max(self.max_batch_size, 1):
                raise ValueError(f"warmup sample {sample.name!r}: batch {sample.batch_size} outside 1..max batch")


def _tensor(spec: TensorSpec, message) -> None:
    message.name = spec.name
    message.data_type = DTYPES[spec.data_type]
    message.dims.extend(spec.dims)
    if spec.label_filename:
        message.label_filename = spec.label_filename
    if spec.allow_ragged_batch:
        message.allow_ragged_batch = True


def to_protobuf(config: ModelConfig) -> pb.ModelConfig:
    message = pb.ModelConfig(
        name=config.name, backend=config.backend, platform=config.platform, max_batch_size=config.max_batch_size
    )
    for spec in config.inputs:
        _tensor(spec, message.input.add())
    for spec in config.outputs:
        _tensor(spec, message.output.add())
    _set_batching(config, message)
    if config.is_ensemble:
        # An ensemble runs no code of its own: no instances, no batcher (its steps' models have them).
        _set_ensemble(config, message)
    else:
        _set_instance_group(config, message)
    _set_version_policy(config, message)
    _set_optimization(config, message)
    for key, value in sorted(config.parameters.items()):
        message.parameters[key].string_value = value
    _set_warmup(config, message)
    return message


def _set_warmup(config: ModelConfig, message: pb.ModelConfig) -> None:
    for sample in config.warmup:
        entry = message.model_warmup.add(name=sample.name, batch_size=sample.batch_size, count=sample.count)
        for name, spec in sample.inputs.items():
            warmup_input = entry.inputs[name]
            warmup_input.data_type = DTYPES[spec.data_type]
            warmup_input.dims.extend(spec.dims)
            if spec.data_file is not None:
                warmup_input.input_data_file = spec.data_file
            else:
                setattr(warmup_input, spec.synthetic, True)


def _set_ensemble(config: ModelConfig, message: pb.ModelConfig) -> None:
    for step in config.ensemble_steps:
        entry = message.ensemble_scheduling.step.add(model_name=step.model_name, model_version=step.model_version)
        entry.input_map.update(step.input_map)
        entry.output_map.update(step.output_map)


def _set_version_policy(config: ModelConfig, message: pb.ModelConfig) -> None:
    if config.version_policy == "all":
        message.version_policy.all.SetInParent()
    elif config.version_policy == "specific":
        message.version_policy.specific.versions.extend(config.specific_versions)
    else:
        message.version_policy.latest.num_versions = config.latest_versions


def _set_optimization(config: ModelConfig, message: pb.ModelConfig) -> None:
    for accelerator in config.gpu_accelerators:
        entry = message.optimization.execution_accelerators.gpu_execution_accelerator.add(name=accelerator.name)
        for key, value in accelerator.parameters.items():
            entry.parameters[key] = value
    if config.cuda_graphs:
        message.optimization.cuda.graphs = True


def _set_batching(config: ModelConfig, message: pb.ModelConfig) -> None:
    batching = config.dynamic_batching
    if batching is None:
        return
    message.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    message.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    message.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size


def _set_instance_group(config: ModelConfig, message: pb.ModelConfig) -> None:
    group = message.instance_group.add()
    group.count = config.instance_count
    group.kind = pb.ModelInstanceGroup.Kind.Value(config.instance_kind)


def render(config: ModelConfig) -> str:
    return text_format.MessageToString(to_protobuf(config))


def _tensor_from(message) -> TensorSpec:
    return TensorSpec(
        name=message.name,
        dims=tuple(message.dims),
        data_type=pb.DataType.Name(message.data_type).removeprefix("TYPE_"),
        label_filename=getattr(message, "label_filename", "") or None,  # outputs only
        allow_ragged_batch=getattr(message, "allow_ragged_batch", False),  # inputs only
    )


def _warmup_from(message: pb.ModelConfig) -> tuple[WarmupSample, ...]:
    samples = []
    for entry in message.model_warmup:
        inputs = {}
        for name, warmup_input in entry.inputs.items():
            source = warmup_input.WhichOneof("input_data_type")
            inputs[name] = WarmupInput(
                data_type=pb.DataType.Name(warmup_input.data_type).removeprefix("TYPE_"),
                dims=tuple(warmup_input.dims),
                data_file=warmup_input.input_data_file if source == "input_data_file" else None,
                synthetic=source if source in ("zero_data", "random_data") else "zero_data",
            )
        samples.append(WarmupSample(entry.name, entry.batch_size, inputs, entry.count))
    return tuple(samples)


def parse(text: str) -> ModelConfig:
    message = text_format.Parse(text, pb.ModelConfig())
    batching = None
    if message.HasField("dynamic_batching"):
        batching = DynamicBatching(
            preferred_batch_sizes=tuple(message.dynamic_batching.preferred_batch_size),
            max_queue_delay_us=message.dynamic_batching.max_queue_delay_microseconds,
            max_queue_size=message.dynamic_batching.default_queue_policy.max_queue_size,
        )
    group = message.instance_group[0] if message.instance_group else None
    policy = message.version_policy.WhichOneof("policy_choice") or "latest"
    accelerators = tuple(
        ExecutionAccelerator(a.name, dict(a.parameters))
        for a in message.optimization.execution_accelerators.gpu_execution_accelerator
    )
    return ModelConfig(
        name=message.name,
        inputs=tuple(_tensor_from(t) for t in message.input),
        outputs=tuple(_tensor_from(t) for t in message.output),
        backend=message.backend,
        platform=message.platform,
        max_batch_size=message.max_batch_size,
        dynamic_batching=batching,
        instance_count=group.count if group else 1,
        instance_kind=pb.ModelInstanceGroup.Kind.Name(group.kind) if group else "KIND_CPU",
        version_policy=policy,
        latest_versions=message.version_policy.latest.num_versions or 1,
        specific_versions=tuple(message.version_policy.specific.versions),
        parameters={key: value.string_value for key, value in message.parameters.items()},
        gpu_accelerators=accelerators,
        cuda_graphs=message.optimization.cuda.graphs,
        warmup=_warmup_from(message),
        ensemble_steps=tuple(
            EnsembleStep(step.model_name, dict(step.input_map), dict(step.output_map), step.model_version)
            for step in message.ensemble_scheduling.step
        ),
    )


# A model folder in the repository: its config, its versions, and the rollout the config describes.


def present_versions(model_dir: Path) -> list[int]:
    """The version folders of a model (what Triton can load), oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def served_versions(config: ModelConfig, present: list[int]) -> list[int]:
    """The versions Triton serves under `config`'s version policy, of those `present`."""
    if config.version_policy == "all":
        return list(present)
    if config.version_policy == "specific":
        return [v for v in present if v in config.specific_versions]
    return present[-config.latest_versions :]


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.pbtxt"
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        raise RolloutError(f"model {model_dir.name!r} is not in repository {model_dir.parent}") from None
    except (OSError, text_format.ParseError, ValueError) as e:
        raise RolloutError(f"{path} cannot be read: {e}") from e


def write_config(model_dir: Path, config: ModelConfig) -> None:
    """Staged beside config.pbtxt and renamed over it: a polling Triton reads the old one or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=".config.pbtxt.", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(config))
        os.replace(tmp, model_dir / "config.pbtxt")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rollout_of(config: ModelConfig) -> Rollout | None:
    try:
        return Rollout.from_parameters(config.parameters)
    except (KeyError, ValueError) as e:
        raise RolloutError(f"model {config.name!r} has rollout parameters that cannot be read: {e}") from e


def with_rollout(config: ModelConfig, rollout: Rollout) -> ModelConfig:
    """`config` serving the rollout's two versions (and no other), with the split in its parameters."""
    kept = {k: v for k, v in config.parameters.items() if not k.startswith(ROLLOUT_PREFIX)}
    return dataclasses.replace(
        config,
        version_policy="specific",
        specific_versions=tuple(sorted(rollout.versions)),
        parameters={**kept, **rollout.to_parameters()},
    )


def serving_only(config: ModelConfig, version: int) -> ModelConfig:
    """`config` serving `version` alone, without a rollout."""
    return dataclasses.replace(
        config,
        version_policy="specific",
        specific_versions=(version,),
        parameters={k: v for k, v in config.parameters.items() if not k.startswith(ROLLOUT_PREFIX)},
    )


def pin_served_version(model_dir: Path) -> int:
    """Before a new version lands beside it: the config written to serve the version it serves now (the
    newest served), so that the new version is not served by a `latest` policy before its rollout starts."""
    config = read_config(model_dir)
    if rollout_of(config) is not None:
        raise RolloutError(f"model {model_dir.name!r} has a rollout under way: promote or abort it first")
    served = served_versions(config, present_versions(model_dir))
    if not served:
        raise RolloutError(f"model {model_dir.name!r} serves no version to keep as the stable one")
    if config.version_policy != "specific" or config.specific_versions != (served[-1],):
        write_config(model_dir, serving_only(config, served[-1]))
    return served[-1]
