"""TensorRT engines from the exported ONNX model (needs an NVIDIA GPU and the `tensorrt` package).

Writes `model.plan` and, beside it, `model.plan.json` with the TensorRT version and the GPU's compute
capability: an engine only loads in the TensorRT release, and runs best on the GPU, it was built for,
and `publish` checks the recorded version against the target Triton's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import BuilderError

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
WORKSPACE_BYTES = 2 << 30


class EngineError(BuilderError):
    """A TensorRT engine cannot be built here, or a plan's record is missing."""


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
            raise EngineError(f"need 1 <= min batch <= opt batch <= max batch, got "
                              f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")


def _import_tensorrt():
    """TensorRT and a CUDA device, or an EngineError saying which is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU); "
                          "or publish the ONNX model with --target gpu to build the engine in Triton") from e
    import torch

    if not torch.cuda.is_available():
        raise EngineError("no NVIDIA GPU is visible (torch.cuda.is_available() is False); an engine must be "
                          "built on a GPU; or publish the ONNX model with --target gpu")
    return trt


def engine_info_path(plan_path: Path) -> Path:
    return Path(plan_path).with_name(Path(plan_path).name + ".json")


def read_engine_info(plan_path: Path) -> dict:
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise EngineError(f"engine {plan_path} does not exist")
    info_path = engine_info_path(plan_path)
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{info_path} (the TensorRT version and GPU of {plan_path.name}) is missing or "
                          f"unreadable; rebuild the engine with `builder engine`") from e


def _calibrator(trt, images: np.ndarray, batch_size: int, cache_path: Path):
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.position = 0
            self.device_batch = torch.empty((batch_size, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if self.position + batch_size > len(images):
                return None
            chunk = torch.from_numpy(images[self.position:self.position + batch_size])
            self.device_batch.copy_(chunk)
            self.position += batch_size
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: Path, output: Path, config: EngineConfig = EngineConfig(),
                 calibration: np.ndarray | None = None) -> Path:
    """Parse the ONNX model, build a serialized engine with one optimization profile, write plan + record."""
    trt = _import_tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    builder_config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines fall back to FP16, not FP32
    input_tensor = network.get_input(0)
    sample = tuple(input_tensor.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(input_tensor.name, (config.min_batch, *sample), (config.opt_batch, *sample),
                      (config.max_batch, *sample))
    builder_config.add_optimization_profile(profile)
    if config.precision == "int8":
        if calibration is None:
            raise EngineError("an INT8 engine needs calibration images")
        builder_config.set_flag(trt.BuilderFlag.INT8)
        builder_config.set_calibration_profile(profile)
        cache = Path(output).with_name(Path(output).name + ".calibration")
        builder_config.int8_calibrator = _calibrator(trt, calibration, min(config.opt_batch, len(calibration)), cache)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    major, minor = torch.cuda.get_device_capability()
    info = {"tensorrt_version": trt.__version__, "compute_capability": f"{major}.{minor}",
            "gpu": torch.cuda.get_device_name(), "source_onnx": str(Path(onnx_path).resolve()),
            "input": input_tensor.name, "output": network.get_output(0).name, **asdict(config)}
    engine_info_path(output).write_text(json.dumps(info, indent=2))
    os.replace(tmp, output)
    log.info("built %s (%s, TensorRT %s, compute capability %s)", output, config.precision, trt.__version__,
             info["compute_capability"])
    return output


def engine_from_onnx(onnx_path: Path, output: Path, config: EngineConfig = EngineConfig()) -> Path:
    """`builder engine`: calibration images (INT8) come from the run recorded in the ONNX metadata."""
    calibration = None
    if config.precision == "int8":
        _import_tensorrt()  # fail on a machine without GPU before loading data
        from server.preprocess import PreprocessSpec

        from .evaluate import load_run_dataset
        from .quantize import calibration_images, read_metadata

        metadata = read_metadata(Path(onnx_path))
        spec = PreprocessSpec.from_dict(json.loads(metadata["preprocess"]))
        dataset = load_run_dataset(json.loads(metadata["dataset"]))
        calibration = calibration_images(dataset, spec, config.calibration_images, seed=config.seed)
    return build_engine(onnx_path, output, config, calibration)
