"""TensorRT engines from the exported ONNX model (needs an NVIDIA GPU and the `tensorrt` package).

Writes `model.plan` and, beside it, `model.plan.json` with the TensorRT version, the GPU's compute
capability, and the SHA-256 of the source ONNX model and of the plan: an engine only loads in the
TensorRT release, and on the GPU generation, it was built for, and `publish --plan` checks all of it.
Only the TensorRT release of the target Triton (10.5 for 24.10) is accepted here, before anything is built.

INT8 is explicit quantization only: the engine is built from a Q/DQ model in TensorRT's form (INT8, zero
point 0), which `builder quantize --target gpu` writes with NVIDIA Model Optimizer. TensorRT's implicit
calibration (IInt8EntropyCalibrator2 and the calibration cache) is deprecated since TensorRT 10.1,
"superseded by explicit quantization" (TensorRT C++ API, deprecated list), and removed in TensorRT 11.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EngineError
from .plans import engine_info_path, file_sha256, onnx_sha256, read_engine_info  # noqa: F401  (public here)
from .tensorrt_onnx import check_explicit_int8
from .trt_runtime import check_tensorrt_version, import_tensorrt  # noqa: F401  (public here)

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
WORKSPACE_BYTES = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(
                f"need 1 <= min batch <= opt batch <= max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
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


def build_engine(onnx_path: Path, output: Path, config: EngineConfig = EngineConfig()) -> Path:
    """Parse the ONNX model, build a serialized engine with one optimization profile, write plan + record.

    INT8 needs a Q/DQ model in TensorRT's form (checked first, before TensorRT is even imported)."""
    if config.precision == "int8":
        check_explicit_int8(Path(onnx_path))
    trt = import_tensorrt()
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
    # FP16 for every layer the model leaves in float: all of an fp16 engine, and in an INT8 one the layers
    # ModelOpt kept out of Q/DQ (its high_precision_dtype is fp32, leaving this choice to the engine build).
    builder_config.set_flag(trt.BuilderFlag.FP16)
    input_tensor = network.get_input(0)
    sample = tuple(input_tensor.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_tensor.name, (config.min_batch, *sample), (config.opt_batch, *sample), (config.max_batch, *sample)
    )
    builder_config.add_optimization_profile(profile)
    if config.precision == "int8":
        # Explicit quantization: the scales are the model's Q/DQ, so no calibrator. In a weakly typed network
        # (this one: create_network(0)) the INT8 flag lets TensorRT run the Q/DQ-fenced layers in INT8
        # (TensorRT 10 developer guide, "Explicit Quantization").
        builder_config.set_flag(trt.BuilderFlag.INT8)
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
    """`builder engine`: FP16 from a float model, INT8 from the explicit-quantized one."""
    return build_engine(onnx_path, output, config)
