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


# What ONNX Runtime reports as an input's type -> the NumPy dtype it takes (float input, or --pixel-input).
ONNX_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(uint8)": np.dtype(np.uint8)}


def input_problem(array, shape, dtype):
    """Why the session cannot take `array` (its shape has None for dynamic axes), or None."""
    if array.dtype != dtype:
        return f"input is {array.dtype}, the model takes {dtype}"
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = ", ".join("N" if d is None else str(d) for d in shape)
        return f"input of shape {list(array.shape)}, the model takes [{wanted}]"
    if array.shape[0] == 0:
        return "input holds no images"
    return None


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
        session_input = self.session.get_inputs()[0]
        self.input_dtype = ONNX_DTYPES.get(session_input.type)
        if self.input_dtype is None:
            raise pb_utils.TritonModelException(f"model.onnx takes {session_input.type}, which this model cannot serve")
        # None where an axis is dynamic; a fixed batch axis means requests cannot be run together.
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in session_input.shape)
        self.output_names = [output["name"] for output in config["output"]]

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays = {}
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = input_problem(array, self.input_shape, self.input_dtype)
            if problem:
                responses[i] = error_response(problem, pb_utils.TritonError.INVALID_ARG)
            else:
                arrays[i] = array
        if self.input_shape[0] is None:
            groups = [list(arrays)] if arrays else []  # Triton's dynamic batcher gathered these: one batch
        else:
            groups = [[i] for i in arrays]
        for group in groups:
            for i, response in zip(group, self._run([arrays[i] for i in group])):
                responses[i] = response
        return responses

    def _run(self, arrays):
        """One response per array, from one run of the session over all of them."""
        sizes = [array.shape[0] for array in arrays]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            outputs = self.session.run(self.output_names, {self.input_name: batch})
            wrong = [o.shape for o in outputs if o.shape[:1] != (len(batch),)]
            if wrong:
                raise ValueError(f"outputs of shape {wrong} for a batch of {len(batch)}")
        except Exception as e:
            return [error_response(f"inference failed: {e}", pb_utils.TritonError.INTERNAL) for _ in arrays]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[start : start + size]))
                for name, output in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses


def error_response(message, code):
    # A TritonError of its own for every response: one shared by several responses of an execute() made the
    # backend read freed memory and took the whole tritonserver down (signal 11).
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
