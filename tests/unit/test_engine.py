"""The TensorRT engine stage's settings, the INT8 source it accepts, and what it says when TensorRT cannot run.

The ONNX models here are built by hand (a convolution, with and without Q/DQ): no training."""

import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from builder.cli import main
from builder.engine import EngineConfig, EngineError, build_engine
from builder.trt_runtime import EngineRunner, tensorrt_unavailable
from tests.onnx_variants import conv_classifier


def test_bad_batch_profile_is_refused():
    with pytest.raises(EngineError, match="min batch <= opt batch <= max batch"):
        EngineConfig(min_batch=8, opt_batch=4)


@pytest.mark.parametrize(
    ("zero_point", "problem"),
    [
        (None, "has no QuantizeLinear/DequantizeLinear: a float model"),
        (np.uint8(128), "QuantizeLinear q_input is uint8, not int8"),
        (np.int8(3), "has a non-zero zero point"),
    ],
)
def test_int8_engine_from_a_model_not_in_tensorrts_qdq_form_is_one_line_naming_what_to_run(
    tmp_path, capsys, zero_point, problem
):
    model = conv_classifier(tmp_path / "model.onnx", zero_point)
    output = tmp_path / "out" / "model.plan"
    assert main(["engine", "--onnx", str(model), "--precision", "int8", "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert problem in line and "`builder quantize --target gpu`" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no plan, no record, no folder


def test_an_int8_zero_point_0_model_passes_the_check_and_goes_on_to_tensorrt(tmp_path, monkeypatch):
    model = conv_classifier(tmp_path / "model.onnx", np.int8(0))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EngineError, match=r"TensorRT is not installed: pip install 'tensorrt==10\.5\.\*'"):
        build_engine(model, tmp_path / "model.plan", EngineConfig(precision="int8"))


def test_fp16_takes_a_float_model_as_before(tmp_path, monkeypatch):
    model = conv_classifier(tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_engine(model, tmp_path / "model.plan", EngineConfig(precision="fp16"))


def test_the_runner_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"pip install 'tensorrt==10\.5\.\*' \(what Triton 24\.10 loads\)"):
        EngineRunner(tmp_path / "model.plan")


def test_why_engines_cannot_run_names_every_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    reason = tensorrt_unavailable()
    assert reason is not None and "tensorrt is not installed: pip install 'tensorrt==10.5.*'" in reason
    assert "no CUDA device" in reason
    wrong = types.ModuleType("tensorrt")
    wrong.__version__ = "10.7.0.23"
    monkeypatch.setitem(sys.modules, "tensorrt", wrong)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tensorrt_unavailable() == (
        "TensorRT 10.7.0.23 is installed and Triton 24.10 loads TensorRT 10.5 plans only: pip install "
        "'tensorrt==10.5.*' (or build inside nvcr.io/nvidia/tensorrt:24.10-py3)"
    )
    wrong.__version__ = "10.5.0.18"
    assert tensorrt_unavailable() is None


def test_an_int8_model_whose_weights_beside_it_are_missing_is_one_line_and_exit_2(tmp_path, capsys):
    import onnx

    model = onnx.load(conv_classifier(tmp_path / "source.onnx", qdq_zero_point=np.int8(0)))
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(
        model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    (folder / "model.onnx.data").unlink()
    code = main(
        ["engine", "--onnx", str(folder / "model.onnx"), "--precision", "int8", "--output", str(tmp_path / "m.plan")]
    )
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "weights stored beside it cannot be read" in error, error
    assert not (tmp_path / "m.plan").exists()


class _RefusingContext:
    """An execution context (TensorRT's IExecutionContext API) that takes every call but refuses `refused`'s
    device address, as TensorRT does for a name the engine lacks or an address it cannot use."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.executed = False

    def set_input_shape(self, name, shape):
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 2)

    def set_tensor_address(self, name, address):
        return name != self.refused

    def execute_async_v3(self, stream):
        self.executed = True
        return True


def test_a_refused_tensor_address_is_an_engine_error_naming_the_tensor(tmp_path):
    # The runner's CUDA calls, on host memory: what is checked is what it does with TensorRT's answers.
    host_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(stream=lambda stream: contextlib.nullcontext()),
        from_numpy=lambda array: types.SimpleNamespace(
            to=lambda device, dtype: torch.from_numpy(array).to(dtype=dtype)
        ),
        empty=lambda shape, dtype, device: torch.empty(shape, dtype=dtype),
    )
    for refused in ("input", "logits"):
        runner = object.__new__(EngineRunner)
        runner.plan_path, runner.input_name, runner.output_name = tmp_path / "model.plan", "input", "logits"
        runner.profile, runner.sample_shape = (1, 1, 4), (1, 4, 4)
        runner._torch, runner._input_dtype, runner._output_dtype = host_torch, torch.float32, torch.float32
        runner._stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
        runner._context = _RefusingContext(refused)
        with pytest.raises(EngineError, match=f"tensor '{refused}' of model.plan"):
            runner.infer(np.zeros((2, 1, 4, 4), np.float32))
        assert not runner._context.executed  # nothing runs on memory TensorRT did not take
