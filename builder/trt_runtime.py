"""TensorRT for the builder: the one release the target Triton loads, imported only when needed, and
`EngineRunner`, which runs a serialized engine (a plan) on batches of images.

The runner uses TensorRT 10's name-based tensor API (set_input_shape, set_tensor_address,
execute_async_v3; "Performing Inference" in the TensorRT 10 developer guide), with torch CUDA tensors as
the device buffers and a torch CUDA stream, so no CUDA binding beyond torch (no pycuda) is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineError
from .model_config import DEFAULT_TRITON_RELEASE, TRITON_TENSORRT


def wanted_tensorrt() -> tuple[str, str]:
    """(Triton release, TensorRT major.minor it loads) for the default target."""
    return DEFAULT_TRITON_RELEASE, TRITON_TENSORRT[DEFAULT_TRITON_RELEASE]


def install_hint() -> str:
    release, wanted = wanted_tensorrt()
    return f"pip install 'tensorrt=={wanted}.*' (what Triton {release} loads)"


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT whose plans the target Triton cannot load, saying in one line what to install."""
    release, wanted = wanted_tensorrt()
    installed = ".".join(str(version).split(".")[:2])
    if installed == wanted:
        return
    problem = f"TensorRT {version} is installed"
    if installed.split(".")[0] != wanted.split(".")[0]:
        # TensorRT 11 removed BuilderFlag.FP16 and BuilderFlag.INT8, which this builder sets (TensorRT's
        # "TensorRT 10.x to 11.x Python API" migration guide, "Removed Python APIs and Replacements").
        problem += ", whose major release lacks APIs this builder uses,"
    raise EngineError(
        f"{problem} and Triton {release} loads TensorRT {wanted} plans only: pip install "
        f"'tensorrt=={wanted}.*' (or build inside nvcr.io/nvidia/tensorrt:{release}-py3)"
    )


def import_tensorrt() -> Any:
    """TensorRT of the release the target Triton loads, and a CUDA device, or an EngineError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            f"TensorRT is not installed: {install_hint()}, on a machine with an NVIDIA GPU; or publish the "
            "ONNX model with --target gpu to build the engine in Triton"
        ) from e
    check_tensorrt_version(getattr(trt, "__version__", "unknown"))
    import torch

    if not torch.cuda.is_available():
        raise EngineError(
            "no NVIDIA GPU is visible (torch.cuda.is_available() is False); an engine must be "
            "built on a GPU; or publish the ONNX model with --target gpu"
        )
    return trt


def tensorrt_unavailable() -> str | None:
    """Why no engine can be built or run here (every reason that applies, on one line); None when one can."""
    reasons = []
    try:
        import tensorrt as trt
    except ImportError:
        reasons.append(f"tensorrt is not installed: {install_hint()}")
    else:
        try:
            check_tensorrt_version(getattr(trt, "__version__", "unknown"))
        except EngineError as e:
            reasons.append(str(e))
    import torch

    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    return "; ".join(reasons) or None


# TensorRT's tensor types by their names in tensorrt.DataType, and the torch type of a buffer for each.
_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    for name, torch_name in _TORCH_DTYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return getattr(torch, torch_name)
    raise EngineError(f"an engine tensor of TensorRT type {dtype} has no torch buffer type here")


class EngineRunner:
    """A TensorRT plan deserialized on this machine's GPU, answering batches of any size its optimization
    profile allows: `infer(batch)` takes and gives host arrays; `profile` is (min, opt, max) batch size."""

    def __init__(self, plan_path: Path) -> None:
        trt = import_tensorrt()
        import torch

        self.plan_path = Path(plan_path)
        try:
            plan = self.plan_path.read_bytes()
        except OSError as e:
            raise EngineError(f"engine {self.plan_path} cannot be read: {e.strerror or e}") from e
        self._torch = torch
        # The runtime must outlive the engines it deserialized (TensorRT's Python API docs, IRuntime).
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(
                f"TensorRT {trt.__version__} cannot deserialize {self.plan_path} (a plan loads only in the "
                "TensorRT release and on the GPU generation it was built for; see TensorRT's log above): "
                "rebuild it here with `builder engine`"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(
                f"{self.plan_path} has inputs {inputs} and outputs {outputs}; a classifier engine has one of each"
            )
        self.input_name: str = inputs[0]
        self.output_name: str = outputs[0]
        # Profile 0, the one `builder engine` builds and a new execution context uses.
        minimum, optimum, maximum = self._engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile: tuple[int, int, int] = (int(minimum[0]), int(optimum[0]), int(maximum[0]))
        self.sample_shape: tuple[int, ...] = tuple(int(d) for d in maximum[1:])
        self._input_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.input_name))
        self._output_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self.output_name))
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The engine's output for `batch` (N, *sample_shape), N within the profile, as a float32 host array."""
        batch = np.asarray(batch)
        low, _, high = self.profile
        if batch.shape[1:] != self.sample_shape:
            raise EngineError(
                f"{self.plan_path.name} takes batches of shape (N, {', '.join(map(str, self.sample_shape))}), "
                f"got {batch.shape}"
            )
        if not low <= len(batch) <= high:
            raise EngineError(
                f"batch {len(batch)} is outside {self.plan_path.name}'s optimization profile ({low} to {high})"
            )
        torch = self._torch
        # Every copy, allocation and the execution go on one stream, in order; the host waits for it once.
        with torch.cuda.stream(self._stream):
            inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(device="cuda", dtype=self._input_dtype)
            if not self._context.set_input_shape(self.input_name, tuple(inputs.shape)):
                raise EngineError(f"TensorRT refused input shape {tuple(inputs.shape)} for {self.plan_path.name}")
            shape = tuple(self._context.get_tensor_shape(self.output_name))
            outputs = torch.empty(shape, dtype=self._output_dtype, device="cuda")
            self._bind(self.input_name, inputs.data_ptr())
            self._bind(self.output_name, outputs.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run {self.plan_path.name}; see its log above")
            answer = outputs.float().cpu()
        self._stream.synchronize()
        return answer.numpy()

    def _bind(self, tensor: str, address: int) -> None:
        """Point the context's `tensor` at device memory; TensorRT says False (and logs why) for a name the
        engine does not have or an address it cannot use (IExecutionContext.set_tensor_address)."""
        if not self._context.set_tensor_address(tensor, address):
            raise EngineError(
                f"TensorRT refused the device address for tensor {tensor!r} of {self.plan_path.name}; see its log above"
            )
