"""Post-training quantization of an exported ONNX classifier.

- `quantize_int8`: static INT8 in QDQ format with per-channel weights, calibrated on training images
  through the real eval transform (the same function the gateway's preprocessing uses). Two flavours,
  chosen by `QuantizeConfig.target`, from the same calibration images:
  - `cpu`: ONNX Runtime's quantizer, uint8 activations with non-zero zero points and int8 weights,
    the combination ONNX Runtime's x86 integer kernels run fastest. TensorRT cannot read it.
  - `gpu`: NVIDIA Model Optimizer (`modelopt.onnx.quantization`), int8 activations and weights with
    zero point 0, Q/DQ placed where TensorRT fuses them (explicit quantization). The TensorRT engine
    (`builder engine`) is to be built from this file, `int8-gpu.onnx` in a build or
    `<model>-int8-gpu.onnx` from `builder quantize --target gpu`, not from the CPU one. ONNX Runtime on
    the CPU runs it too, which is how its accuracy is measured here.
- `convert_fp16`: FP16 weights and activations for GPU targets (inputs and outputs stay FP32, so the
  published interface does not change).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .data import ImageDataset, load_run_dataset
from .errors import QuantizeError, error_line
from .onnx_meta import OnnxMeta, classifier_dims, load_onnx, metadata_of, set_metadata
from .tensorrt_onnx import tensorrt_parser_problems
from .transforms import calibration_images

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "gpu")
# ModelOpt's INT8 calibrators (its quantize() docstring: 'entropy' or 'max'), under this module's names.
MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}


@dataclass(frozen=True)
class QuantizeConfig:
    calibration_images: int = 256
    method: str = "minmax"
    per_channel: bool = True
    # 7-bit weights (ONNX Runtime's reduce_range). x86 CPUs without VNNI (AVX2, older AVX-512) multiply
    # uint8 activations by int8 weights with an instruction that sums pairs of products in int16, which
    # saturates with full 8-bit weights: the served model then drifts from the one calibrated (on an AVX2
    # EPYC, 95.6% top-1 agreement with the float-emulated INT8 graph, 100% with 7 bits). Off: 8-bit weights,
    # exact only where the serving CPU has VNNI, or on a GPU.
    reduce_range: bool = True
    batch_size: int = 32
    seed: int = 0
    # cpu: ONNX Runtime's u8/s8 QDQ for ONNX Runtime on x86; gpu: ModelOpt's int8 zero-point-0 QDQ for
    # TensorRT (its weights are always 8-bit: reduce_range is for the CPU kernels only).
    target: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise QuantizeError(f"calibration method {self.method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if self.target not in TARGETS:
            raise QuantizeError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.target == "gpu" and self.method not in MODELOPT_METHODS:
            raise QuantizeError(
                f"calibration method {self.method!r} is not available for the GPU INT8 "
                f"(NVIDIA Model Optimizer calibrates with {', '.join(MODELOPT_METHODS)})"
            )
        if self.calibration_images < 1:
            raise QuantizeError("calibration_images must be at least 1")


@dataclass(frozen=True)
class QuantizeResult:
    onnx_path: Path
    calibration_images: int
    method: str
    seconds: float
    target: str = "cpu"


def _reader(images: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self):
            return next(self.iterator, None)

        def rewind(self) -> None:
            self.iterator = iter({input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size))

    return Batches()


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def quantize_int8(
    onnx_path: Path,
    output: Path,
    config: QuantizeConfig = QuantizeConfig(),
    dataset: ImageDataset | None = None,
    meta: OnnxMeta | None = None,
) -> QuantizeResult:
    """Static INT8 calibrated on training images: for ONNX Runtime (`config.target` cpu) or TensorRT (gpu).

    `meta`: the model's preprocessing, labels and dataset where the file does not carry them (a model exported
    elsewhere, `onnx_meta.model_interface`); they are written into the INT8 file as export writes them."""
    started = time.monotonic()
    onnx_path, output = Path(onnx_path), Path(output)
    source = load_onnx(onnx_path)
    meta = meta or OnnxMeta.from_props(metadata_of(source), source=onnx_path)
    if meta.preprocess is None:
        raise QuantizeError(
            f"{onnx_path} carries no preprocessing spec: give the preprocessing flags (--resize, --crop, --mean, "
            "--std, --color-mode), or export it with `builder export`"
        )
    if not meta.has_dataset and dataset is None:
        raise QuantizeError(
            f"{onnx_path} names no dataset to calibrate on: give --calibration-data (a folder of class sub-folders)"
        )
    dataset = dataset or load_run_dataset(meta.dataset_recipe)
    meta = meta.with_dataset_labels(dataset.classes, classifier_dims(source)[1])
    metadata = dict(meta.props)
    images = calibration_images(dataset, meta.preprocess, config.calibration_images, seed=config.seed)
    input_name = source.graph.input[0].name

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        if config.target == "gpu":
            proto, extra = _modelopt_int8(onnx_path, output, images, config)
        else:
            proto, extra = _onnxruntime_int8(onnx_path, output, images, input_name, config)
        # The float model's top-1 is not the INT8 model's: left out rather than carried over (the quantizers
        # copy the source's metadata; `builder evaluate` measures it, `builder build` records what it
        # measured), so that publish's accuracy check and a degradation's accuracy cost never take one for
        # the other.
        metadata.pop("val_accuracy", None)
        for position in reversed(range(len(proto.metadata_props))):
            if proto.metadata_props[position].key == "val_accuracy":
                del proto.metadata_props[position]
        set_metadata(
            proto,
            {
                **metadata,
                "precision": "int8",
                "target": config.target,
                "calibration_method": config.method,
                "calibration_images": str(len(images)),
                "source_onnx": str(onnx_path.resolve()),
                **extra,
            },
        )
        onnx.save(proto, str(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "quantized %s -> %s (INT8 for %s, %s calibration on %d images)",
        onnx_path,
        output,
        "TensorRT" if config.target == "gpu" else "ONNX Runtime",
        config.method,
        len(images),
    )
    return QuantizeResult(output, len(images), config.method, time.monotonic() - started, config.target)


def _onnxruntime_int8(
    onnx_path: Path, output: Path, images: np.ndarray, input_name: str, config: QuantizeConfig
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """ONNX Runtime's static QDQ: per-channel s8 weights, u8 activations."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    whole = output.with_name(f".{output.name}.whole")
    prepared = output.with_name(f".{output.name}.prepared")
    quantized = output.with_name(f".{output.name}.quantized")
    try:
        # quant_pre_process copies the .onnx alone to a temporary folder: weights stored beside it (what
        # torch.onnx.export writes by default) would be missing there.
        _write_self_contained(onnx_path, whole)
        quant_pre_process(str(whole), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _reader(images, input_name, config.batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            # u8 activations with s8 weights: the combination x86 kernels run fastest.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=config.reduce_range,
            calibrate_method=_calibrate_method(config.method),
        )
        proto = onnx.load(str(quantized))
    finally:
        for leftover in (whole, prepared, quantized, *output.parent.glob(f".{output.name}.prepared*")):
            Path(leftover).unlink(missing_ok=True)
    return proto, {"weight_bits": "7" if config.reduce_range else "8"}


def _write_self_contained(onnx_path: Path, output: Path) -> None:
    """`onnx_path` as one file, weights inside: a copy of the .onnx alone loses weights stored beside it
    (torch.onnx.export's default writes them to a separate file), and ModelOpt works on the copy."""
    try:
        proto = onnx.load(str(onnx_path))  # reads external data from beside the file
        onnx.save(proto, str(output))
    # onnx's ValidationError for a weight file that is not there, ValueError past protobuf's 2 GB, OSError.
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise QuantizeError(f"could not read {onnx_path} with its weights into one file: {error_line(e)}") from e


def _modelopt_int8(
    onnx_path: Path, output: Path, images: np.ndarray, config: QuantizeConfig
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """NVIDIA Model Optimizer's INT8 for TensorRT, calibrated with ONNX Runtime on the CPU, in a child process
    (it patches ONNX Runtime's calibrators process-wide: see builder/modelopt_int8.py)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        modelopt_version = version("nvidia-modelopt")
    except PackageNotFoundError:
        raise QuantizeError(
            "the GPU INT8 needs NVIDIA Model Optimizer (nvidia-modelopt): make install, or pip install -e '.[builder]'"
        ) from None
    # ModelOpt writes intermediate files beside its input: it works on a copy in a private folder, which
    # goes away whatever happens, so nothing half-written is left beside `output`.
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        source, quantized, calibration = work / "source.onnx", work / "quantized.onnx", work / "images.npy"
        _write_self_contained(onnx_path, source)
        np.save(calibration, images)
        command = [
            sys.executable,
            str(Path(__file__).with_name("modelopt_int8.py")),
            str(source),
            str(quantized),
            str(calibration),
            "--method",
            MODELOPT_METHODS[config.method],
            "--batch",
            str(config.batch_size),
        ]
        child = subprocess.run(command, capture_output=True, text=True)
        for line in (child.stdout + child.stderr).splitlines():
            log.debug("modelopt: %s", line)
        if child.returncode != 0 or not quantized.is_file():
            lines = [line for line in child.stderr.splitlines() if line.strip()] or ["no output"]
            raise QuantizeError(f"NVIDIA Model Optimizer could not quantize {onnx_path}: {lines[-1].strip()}")
        proto = onnx.load(str(quantized))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    problems = tensorrt_parser_problems(proto)
    if problems:
        raise QuantizeError(f"the GPU INT8 of {onnx_path} would not load in TensorRT: {'; '.join(problems[:3])}")
    return proto, {"weight_bits": "8", "quantizer": f"nvidia-modelopt {modelopt_version}"}


def convert_fp16(onnx_path: Path, output: Path, meta: OnnxMeta | None = None) -> Path:
    """FP16 for GPU targets; the graph keeps FP32 inputs and outputs. `meta`: as for `quantize_int8`."""
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = load_onnx(onnx_path)
    load_external_data_for_model(proto, str(Path(onnx_path).parent))
    metadata: Mapping[str, str] = metadata_of(proto)
    half = convert_float_to_float16(proto, keep_io_types=True)
    set_metadata(half, {**metadata, **(meta.props if meta is not None else {}), "precision": "fp16"})
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    onnx.save(half, str(tmp))
    os.replace(tmp, output)
    return output
