"""Triton Python-backend model: runs the ONNX file beside it with ONNX Runtime on the CPU.

Copied by `builder publish` into every version directory, so each version is self-contained.
It imports only numpy and onnxruntime, so the same repository loads in NVIDIA's stock
tritonserver container with `pip install onnxruntime`.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def intra_op_threads(requested: int, instances: int, cores: int) -> int:
    """The threads of each instance's session: `requested`, or with 0 the cores divided among the instances.

    The instances run side by side; more threads than cores leaves a session's threads waiting on whichever
    of them was preempted, and the whole batch waits with them.
    """
    if requested > 0:
        return requested
    return max(1, cores // max(1, instances))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        cores = usable_cores()
        options.intra_op_num_threads = intra_op_threads(
            int(parameters.get("onnxruntime.intra_op_threads", "0")), instances, cores
        )
        pb_utils.Logger.log_info(
            f"{args['model_instance_name']}: ONNX Runtime on {options.intra_op_num_threads} intra-op thread(s) "
            f"({instances} instance(s), {cores} usable core(s))"
        )
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
