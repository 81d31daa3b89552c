"""What an INT8 model's tests share: does ONNX Runtime serve the graph it was given?"""

from pathlib import Path

import numpy as np
import onnxruntime as ort


def integer_kernel_agreement(onnx_path: Path, images: np.ndarray) -> float:
    """Top-1 agreement of ONNX Runtime's fused integer kernels with the same QDQ graph computed in float.

    With every optimization off, ONNX Runtime runs QuantizeLinear/DequantizeLinear literally around float
    operators: the arithmetic the model was calibrated or trained for. Fused, it runs integer kernels,
    which on x86 CPUs without VNNI saturate unless the ranges leave room.
    """
    logits = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        logits.append(session.run(None, {session.get_inputs()[0].name: images})[0])
    emulated, fused = logits
    return float(np.mean(emulated.argmax(axis=1) == fused.argmax(axis=1)))
