"""NVIDIA Model Optimizer's INT8 for TensorRT, run as a child process by `builder.quantize`.

Why a separate process: `modelopt.onnx.quantization` replaces methods of ONNX Runtime's calibrators
(`MinMaxCalibrater`, `HistogramCollector`, ...) for the whole interpreter when it quantizes, after
which ONNX Runtime's own `quantize_static`, the CPU INT8, fails or calibrates differently in that
process. It also logs to stdout. Here it gets an interpreter of its own, and the builder keeps stdout.

Usage: python modelopt_int8.py SOURCE.onnx OUTPUT.onnx IMAGES.npy --method max|entropy --batch N
Only numpy, onnx and modelopt are imported, so the script runs from its path without the package.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np


class _DropNvmlError(logging.Filter):
    """ModelOpt's min-max calibrator asks NVML for the GPU count only to tune ONNX Runtime's memory arena,
    and logs an error where no NVIDIA driver is installed; calibrating on the CPU never needs one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to get GPU count")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("images")
    parser.add_argument("--method", choices=("max", "entropy"), required=True)
    parser.add_argument("--batch", type=int, required=True)
    args = parser.parse_args()

    import onnx
    from modelopt.onnx.quantization import quantize

    images = np.load(args.images)
    input_name = onnx.load(args.source, load_external_data=False).graph.input[0].name
    batch_shape = "x".join(map(str, (min(args.batch, len(images)), *images.shape[1:])))
    logging.getLogger("modelopt.onnx").addFilter(_DropNvmlError())
    # Arguments as documented in modelopt.onnx.quantization.quantize (TensorRT Model Optimizer, ONNX PTQ).
    quantize(
        args.source,
        quantize_mode="int8",
        calibration_method=args.method,
        # ModelOpt's own reader splits the images into batches of this shape.
        calibration_data=images,
        calibration_shapes=f"{input_name}:{batch_shape}",
        calibration_eps=["cpu"],  # ONNX Runtime's CPU provider: no GPU needed to calibrate
        # The layers left unquantized stay FP32 in the file: whether TensorRT runs them in FP16 is the engine
        # build's choice, and ONNX Runtime on the CPU, which measures the file, runs FP32 anyway.
        high_precision_dtype="fp32",
        output_path=args.output,
        log_level="WARNING",
    )


if __name__ == "__main__":
    main()
