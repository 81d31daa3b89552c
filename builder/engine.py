"""TensorRT engines from the exported ONNX model (needs an NVIDIA GPU and the `tensorrt` package).

Writes `model.plan` and, beside it, `model.plan.json` with the TensorRT version, the GPU's compute
capability, and the SHA-256 of the source ONNX model and of the plan: an engine only loads in the
TensorRT release, and on the GPU generation, it was built for, and `publish --plan` checks all of it.
Only the TensorRT release of the target Triton (10.5 for 24.10) is accepted here, before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import load_run_dataset
from .errors import EngineError
from .model_config import DEFAULT_TRITON_RELEASE, TRITON_TENSORRT
from .onnx_meta import read_onnx_meta
from .plans import engine_info_path, file_sha256, onnx_sha256, read_engine_info  # noqa: F401  (public here)
from .transforms import calibration_images

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
WORKSPACE_BYTES = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    calibration_images: int = 256  # int8 only: the same images as ONNX Runtime's calibration
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(
                f"need 1 <= min batch <= opt batch <= max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


def _wanted_tensorrt() -> tuple[str, str]:
    """(Triton release, TensorRT major.minor it loads) for the default target."""
    return DEFAULT_TRITON_RELEASE, TRITON_TENSORRT[DEFAULT_TRITON_RELEASE]


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT whose plans the target Triton cannot load, saying in one line what to install."""
    release, wanted = _wanted_tensorrt()
    installed = ".".join(str(version).split(".")[:2])
    if installed == wanted:
        return
    problem = f"TensorRT {version} is installed"
    if installed.split(".")[0] != wanted.split(".")[0]:
        # TensorRT 11 dropped the implicit INT8 calibration API (IInt8EntropyCalibrator2) this builder uses.
        problem += ", whose major release lacks APIs this builder uses,"
    raise EngineError(
        f"{problem} and Triton {release} loads TensorRT {wanted} plans only: pip install "
        f"'tensorrt=={wanted}.*' (or build inside nvcr.io/nvidia/tensorrt:{release}-py3)"
    )


def _import_tensorrt():
    """TensorRT of the release the target Triton loads, and a CUDA device, or an EngineError saying what is missing."""
    release, wanted = _wanted_tensorrt()
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            f"TensorRT is not installed: pip install 'tensorrt=={wanted}.*' (what Triton {release} "
            "loads), on a machine with an NVIDIA GPU; or publish the ONNX model with --target gpu "
            "to build the engine in Triton"
        ) from e
    check_tensorrt_version(getattr(trt, "__version__", "unknown"))
    import torch

    if not torch.cuda.is_available():
        raise EngineError(
            "no NVIDIA GPU is visible (torch.cuda.is_available() is False); an engine must be "
            "built on a GPU; or publish the ONNX model with --target gpu"
        )
    return trt


def calibration_key(onnx_digest: str, images: np.ndarray, batch_size: int) -> str:
    """What an INT8 calibration cache is valid for: this model's weights, these images, this batch size."""
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{onnx_digest}|{images.dtype.str}|{images.shape}|{batch_size}|".encode())
    digest.update(images.tobytes())
    return digest.hexdigest()


def read_calibration_cache(cache_path: Path, key: str) -> bytes | None:
    """The cached scales if they were computed for `key` (see calibration_key), else None."""
    try:
        stored = json.loads(cache_path.with_name(cache_path.name + ".json").read_text())
        cache = cache_path.read_bytes()
    except (OSError, ValueError):
        return None
    if stored.get("key") != key or stored.get("sha256") != hashlib.sha256(cache).hexdigest():
        return None  # another model, other images, or a cache written halfway
    return cache


def write_calibration_cache(cache_path: Path, key: str, cache: bytes) -> None:
    _write_atomic(cache_path, cache)
    _write_atomic(
        cache_path.with_name(cache_path.name + ".json"),
        json.dumps({"key": key, "sha256": hashlib.sha256(cache).hexdigest()}).encode(),
    )


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _calibrator(trt, images: np.ndarray, batch_size: int, cache_path: Path, key: str):
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.position = 0
            self.device_batch = None  # allocated on the first batch: a cache hit needs no GPU memory

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if self.position + batch_size > len(images):
                return None
            if self.device_batch is None:
                self.device_batch = torch.empty((batch_size, *images.shape[1:]), dtype=torch.float32, device="cuda")
            chunk = torch.from_numpy(images[self.position : self.position + batch_size])
            self.device_batch.copy_(chunk)
            self.position += batch_size
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return read_calibration_cache(cache_path, key)

        def write_calibration_cache(self, cache) -> None:
            write_calibration_cache(cache_path, key, bytes(cache))

    return EntropyCalibrator()


def build_engine(
    onnx_path: Path, output: Path, config: EngineConfig = EngineConfig(), calibration: np.ndarray | None = None
) -> Path:
    """Parse the ONNX model, build a serialized engine with one optimization profile, write plan + record."""
    trt = _import_tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # From the path, not from bytes: weights stored beside the model are found relative to it (TensorRT's
    # OnnxParser.parse needs the path for external data anyway; parse_from_file takes it directly).
    onnx_digest = onnx_sha256(onnx_path)
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    builder_config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines fall back to FP16, not FP32
    input_tensor = network.get_input(0)
    sample = tuple(input_tensor.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_tensor.name, (config.min_batch, *sample), (config.opt_batch, *sample), (config.max_batch, *sample)
    )
    builder_config.add_optimization_profile(profile)
    if config.precision == "int8":
        if calibration is None:
            raise EngineError("an INT8 engine needs calibration images")
        builder_config.set_flag(trt.BuilderFlag.INT8)
        builder_config.set_calibration_profile(profile)
        cache = Path(output).with_name(Path(output).name + ".calibration")
        cache.parent.mkdir(parents=True, exist_ok=True)
        batch_size = min(config.opt_batch, len(calibration))
        # Reused only for the same weights and images: a retrained model gets scales of its own.
        builder_config.int8_calibrator = _calibrator(
            trt, calibration, batch_size, cache, calibration_key(onnx_digest, calibration, batch_size)
        )
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    plan_bytes = bytes(serialized)
    major, minor = torch.cuda.get_device_capability()
    info = {
        "tensorrt_version": trt.__version__,
        "compute_capability": f"{major}.{minor}",
        "gpu": torch.cuda.get_device_name(),
        "source_onnx": str(Path(onnx_path).resolve()),
        "source_onnx_sha256": onnx_digest,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "input": input_tensor.name,
        "output": network.get_output(0).name,
        **asdict(config),
    }
    _place_plan(Path(output), plan_bytes, info)
    log.info(
        "built %s (%s, TensorRT %s, compute capability %s)",
        output,
        config.precision,
        trt.__version__,
        info["compute_capability"],
    )
    return output


def _place_plan(output: Path, plan_bytes: bytes, info: dict) -> None:
    """Plan first, then its record, each renamed into place: a record never describes another plan.

    The old record goes before the new plan arrives; if anything fails in between, the plan has no record
    and `publish --plan` refuses it until it is rebuilt.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    engine_info_path(output).unlink(missing_ok=True)
    _write_atomic(output, plan_bytes)
    _write_atomic(engine_info_path(output), json.dumps(info, indent=2).encode())


def engine_from_onnx(onnx_path: Path, output: Path, config: EngineConfig = EngineConfig()) -> Path:
    """`builder engine`: calibration images (INT8) come from the run recorded in the ONNX metadata."""
    calibration = None
    if config.precision == "int8":
        _import_tensorrt()  # fail on a machine without GPU before loading data
        meta = read_onnx_meta(Path(onnx_path))
        if meta.preprocess is None or not meta.has_dataset:
            raise EngineError(f"{onnx_path} carries no preprocessing spec or dataset; export it with `builder export`")
        dataset = load_run_dataset(meta.dataset_recipe)
        calibration = calibration_images(dataset, meta.preprocess, config.calibration_images, seed=config.seed)
    return build_engine(onnx_path, output, config, calibration)
