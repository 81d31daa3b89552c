"""Triton Python-backend model: runs the ONNX file beside it with ONNX Runtime on the CPU.

Copied by `builder publish` into every version directory, so each version is self-contained.
It imports only numpy and onnxruntime, so the same repository loads in NVIDIA's stock
tritonserver container with `pip install onnxruntime`.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        # 0 lets ONNX Runtime use every core; several instances on one machine should set it lower.
        options.intra_op_num_threads = int(parameters.get("onnxruntime.intra_op_threads", "0"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads busy-wait for the next run by default; on a machine whose cores the
        # gateway shares, that spinning takes CPU from decoding the next images.
        spinning = parameters.get("onnxruntime.allow_spinning", "1")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = config["input"][0]["name"]
        # float32 tensors, or uint8 pixels for a model published with --pixel-input.
        self.input_dtype = np.uint8 if self.session.get_inputs()[0].type == "tensor(uint8)" else np.float32
        self.output_names = [output["name"] for output in config["output"]]

    def execute(self, requests):
        # Triton's dynamic batcher hands over every request it gathered: run them as one batch.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [array.shape[0] for array in arrays]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            outputs = self.session.run(self.output_names, {self.input_name: batch.astype(self.input_dtype, copy=False)})
        except Exception as e:  # one failure answers every request of the batch with the reason
            error = pb_utils.TritonError(f"inference failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[start:start + size]))
                for name, output in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
