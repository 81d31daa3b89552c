import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder import model_config
from builder.cli import main
from builder.engine import EngineConfig, EngineError, build_engine, engine_info_path, read_engine_info
from builder.errors import PublishError
from builder.publish import PublishSettings, publish_plan
from builder.trt_runtime import tensorrt_unavailable
from tests.onnx_variants import conv_classifier, retrained


def _gpu_and_tensorrt() -> bool:
    import torch

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_gpu_and_tensorrt(), reason="this machine can build engines")
def test_engine_without_gpu_or_tensorrt_is_a_one_line_error(tiny_run, tmp_path, capsys):
    with pytest.raises(EngineError, match="TensorRT is not installed|no NVIDIA GPU"):
        build_engine(tiny_run / "model.onnx", tmp_path / "model.plan")
    assert main(["engine", "--onnx", str(tiny_run / "model.onnx"), "--output", str(tmp_path / "model.plan")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _validation_images(run_dir: Path) -> np.ndarray:
    from builder.evaluate import validation_data
    from builder.onnx_meta import read_onnx_meta

    return np.concatenate([images for images, _ in validation_data(read_onnx_meta(run_dir / "model.onnx")).batches()])


UNAVAILABLE = tensorrt_unavailable()


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no engine can be built here: {UNAVAILABLE}")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_built_engine_deserializes_and_answers_like_onnx_runtime(tiny_run, tmp_path, precision):
    """Through EngineRunner at the profile's min, opt and max batch, against ONNX Runtime on the CPU running the
    model the engine was built from: FP16 logits within 1e-2 of the logits' scale, INT8 top-1 agreement >= 95%
    over the validation split."""
    import onnxruntime as ort

    from builder.engine import engine_from_onnx
    from builder.quantize import QuantizeConfig, quantize_int8
    from builder.trt_runtime import EngineRunner

    source = tiny_run / "model.onnx"
    if precision == "int8":
        gpu_int8 = QuantizeConfig(calibration_images=64, target="gpu")
        source = quantize_int8(source, tmp_path / "int8-gpu.onnx", gpu_int8).onnx_path
    config = EngineConfig(precision=precision, opt_batch=8, max_batch=16)
    plan = engine_from_onnx(source, tmp_path / "model.plan", config)
    info = read_engine_info(plan)
    assert info["precision"] == precision and "." in info["compute_capability"]
    assert info["tensorrt_version"].startswith("10.5.")
    runner = EngineRunner(plan)
    assert (runner.profile, runner.input_name, runner.output_name) == ((1, 8, 16), info["input"], info["output"])
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    images = _validation_images(tiny_run)
    for batch in runner.profile:
        expected = session.run(None, {runner.input_name: images[:batch]})[0]
        answered = runner.infer(images[:batch])
        assert answered.shape == expected.shape and np.isfinite(answered).all()
        if precision == "fp16":
            assert np.abs(answered - expected).max() <= 1e-2 * np.abs(expected).max()
    agree = 0
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        expected = session.run(None, {runner.input_name: chunk})[0]
        agree += int((runner.infer(chunk).argmax(1) == expected.argmax(1)).sum())
    assert agree >= 0.95 * len(images), f"top-1 agreement {agree}/{len(images)}"


def _fake_plan(folder, version):
    plan = folder / "model.plan"
    plan.write_bytes(b"serialized engine")
    engine_info_path(plan).write_text(
        json.dumps({"tensorrt_version": version, "compute_capability": "9.0", "max_batch": 16})
    )
    return plan


def test_publish_refuses_a_plan_built_with_another_tensorrt_than_the_target_tritons(tiny_run, tmp_path):
    plan = _fake_plan(tmp_path, "10.7.0")
    with pytest.raises(PublishError, match=r"built with TensorRT 10.7.0 but Triton 24.10 loads TensorRT 10.5"):
        publish_plan(plan, tiny_run / "model.onnx", tmp_path / "repo", "digits")
    assert not (tmp_path / "repo" / "digits").exists()


def test_a_plan_without_its_record_is_refused(tiny_run, tmp_path):
    plan = _fake_plan(tmp_path, "10.5.0")
    engine_info_path(plan).unlink()
    with pytest.raises(EngineError, match="missing or unreadable"):
        publish_plan(plan, tiny_run / "model.onnx", tmp_path / "repo", "digits")


def test_a_matching_plan_is_published_for_the_tensorrt_backend_with_cuda_graphs(tiny_run, tmp_path):
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx")
    published = publish_plan(
        plan,
        tiny_run / "model.onnx",
        tmp_path / "repo",
        "digits",
        settings=PublishSettings(
            target="gpu", max_batch_size=32, preferred_batch_sizes=(4, 8), compute_capability="8.9"
        ),
    )
    assert sorted(p.name for p in published.version_dir.iterdir()) == ["build.json", "model.plan"]
    config = model_config.parse((published.model_dir / "config.pbtxt").read_text())
    assert (config.platform, config.backend, config.instance_kind) == ("tensorrt_plan", "tensorrt", "KIND_GPU")
    assert config.cuda_graphs and config.max_batch_size == 16 and not config.gpu_accelerators


def test_the_cli_publishes_a_plan_for_the_gpu_without_being_told(tiny_run, tmp_path):
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx")
    common = [
        "publish",
        "--plan",
        str(plan),
        "--onnx",
        str(tiny_run / "model.onnx"),
        "--repository",
        str(tmp_path / "repo"),
        "--compute-capability",
        "8.9",
    ]
    assert main([*common, "--name", "digits"]) == 0
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert (config.backend, config.instance_kind, config.instance_count) == ("tensorrt", "KIND_GPU", 1)
    assert not any(key.startswith("onnxruntime.") for key in config.parameters)
    # Asked for the CPU, a plan is refused with one line and nothing is written.
    assert main([*common, "--name", "cpu", "--target", "cpu"]) == 2
    assert not (tmp_path / "repo" / "cpu").exists()


# ------------------------------------------------------------------ a TensorRT stand-in for this CPU machine
#
# What engine.py asks of the `tensorrt` module (10.x Python API), answered without a GPU: the parser reads the
# ONNX graph the way TensorRT's does (bytes alone cannot reach external weights; a path can), and the builder
# keeps each configuration it was given. It has no calibrator API: INT8 is explicit quantization only.


class _FakeTensorRT(types.ModuleType):
    def __init__(self, version: str = "10.5.0.18") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.built_configs: list = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity=None) -> None:
                pass

        class Tensor:
            def __init__(self, name, shape) -> None:
                self.name, self.shape = name, shape

        class Network:
            def __init__(self) -> None:
                self.inputs, self.outputs = [], []

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.network, self.errors = network, []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

            def _read(self, proto) -> bool:
                def dims(v):
                    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)

                initializers = {i.name for i in proto.graph.initializer}
                self.network.inputs = [Tensor(i.name, dims(i)) for i in proto.graph.input if i.name not in initializers]
                self.network.outputs = [Tensor(o.name, dims(o)) for o in proto.graph.output]
                return True

            def parse(self, model, path=None) -> bool:
                proto = onnx.load_model_from_string(bytes(model))
                if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
                    if path is None:
                        self.errors.append("external weights cannot be found without the model's path")
                        return False
                    onnx.load_external_data_for_model(proto, str(Path(path).parent))
                return self._read(proto)

            def parse_from_file(self, model: str) -> bool:
                return self._read(onnx.load(model))

        class Profile:
            def set_shape(self, name, minimum, optimum, maximum) -> None:
                self.shapes = {name: (minimum, optimum, maximum)}

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set[str] = set()

            def set_memory_pool_limit(self, pool, size) -> None:
                pass

            def set_flag(self, flag) -> None:
                self.flags.add(flag)

            def add_optimization_profile(self, profile) -> int:
                return 0

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags=0):
                return Network()

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.built_configs.append(config)
                return b"serialized engine for " + network.get_input(0).name.encode()

        self.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        self.DataType = types.SimpleNamespace(FLOAT="float", HALF="half")

        class Engine:
            """A deserialized classifier engine: input (N, 1, 8, 8), profile batch 1 / 8 / 32."""

            num_io_tensors = 2

            def get_tensor_name(self, index):
                return ("input", "logits")[index]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name == "input" else fake.TensorIOMode.OUTPUT

            def get_tensor_profile_shape(self, name, profile_index):
                return [(1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8)]

            def get_tensor_dtype(self, name):
                return fake.DataType.FLOAT

            def create_execution_context(self):
                return object()

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, plan):
                return Engine() if bytes(plan).startswith(b"serialized engine") else None

        self.Logger, self.OnnxParser, self.Builder, self.Runtime = Logger, OnnxParser, Builder, Runtime
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(FP16="fp16", INT8="int8")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of compute capability 8.9 as torch reports it, and TensorRT 10.5 (what Triton 24.10 loads)."""
    import torch

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    real_empty = torch.empty
    # Device buffers become host tensors: nothing here runs a kernel.
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))
    return fake


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(("installed", "problem"), [("11.0", "TensorRT 11"), ("10.3", "TensorRT 10.3")])
def test_a_tensorrt_other_than_the_one_triton_loads_is_refused_with_what_to_install(
    tiny_run, tmp_path, monkeypatch, capsys, installed, problem
):
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(installed))
    with pytest.raises(EngineError, match=re.escape(problem)):
        build_engine(tiny_run / "model.onnx", tmp_path / "model.plan")
    assert main(["engine", "--onnx", str(tiny_run / "model.onnx"), "--output", str(tmp_path / "model.plan")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'tensorrt==10.5.*'" in line and "Triton 24.10" in line
    assert list(tmp_path.iterdir()) == []


def test_the_engine_and_its_record_name_the_model_gpu_and_tensorrt_they_were_built_from(tiny_run, tmp_path, fake_gpu):
    plan = build_engine(tiny_run / "model.onnx", tmp_path / "out" / "model.plan")
    assert plan.read_bytes() == b"serialized engine for input"
    info = read_engine_info(plan)
    assert (info["tensorrt_version"], info["compute_capability"], info["input"]) == ("10.5.0.18", "8.9", "input")
    assert info["source_onnx_sha256"] == _sha256(tiny_run / "model.onnx")
    assert info["plan_sha256"] == _sha256(plan)
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_onnx_weights_stored_beside_the_model_are_read(tiny_run, tmp_path, fake_gpu):
    model = onnx.load(str(tiny_run / "model.onnx"))
    onnx.save(
        model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.weights", size_threshold=0
    )
    assert (tmp_path / "model.weights").stat().st_size > 0
    plan = build_engine(tmp_path / "model.onnx", tmp_path / "model.plan")
    assert read_engine_info(plan)["input"] == "input"


def test_an_int8_engine_is_built_from_the_qdq_model_with_explicit_quantization(tmp_path, fake_gpu):
    model = conv_classifier(tmp_path / "model-int8-gpu.onnx", np.int8(0))
    plan = build_engine(model, tmp_path / "out" / "model.plan", EngineConfig(precision="int8"))
    (config,) = fake_gpu.built_configs
    # The scales are the model's Q/DQ: no calibrator, no calibration images, no calibration cache.
    assert config.flags == {"int8", "fp16"} and not hasattr(config, "int8_calibrator")
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]
    assert read_engine_info(plan)["precision"] == "int8"


def test_the_runner_reads_names_and_profile_from_the_plan_and_refuses_batches_outside_it(
    tmp_path, fake_gpu, monkeypatch
):
    import torch

    from builder.trt_runtime import EngineRunner

    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: None)  # nothing here runs on a device
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"serialized engine")
    runner = EngineRunner(plan)
    assert (runner.input_name, runner.output_name, runner.profile) == ("input", "logits", (1, 8, 32))
    assert runner.sample_shape == (1, 8, 8)
    with pytest.raises(EngineError, match=r"batch 33 is outside model.plan's optimization profile \(1 to 32\)"):
        runner.infer(np.zeros((33, 1, 8, 8), np.float32))
    with pytest.raises(EngineError, match=r"takes batches of shape \(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        runner.infer(np.zeros((2, 3, 8, 8), np.float32))
    plan.write_bytes(b"another release's plan")
    with pytest.raises(EngineError, match=r"TensorRT 10\.5\.0\.18 cannot deserialize .*rebuild it here"):
        EngineRunner(plan)


def test_with_a_gpu_too_a_float_model_is_refused_for_int8_before_tensorrt_builds(tmp_path, fake_gpu, capsys):
    model = conv_classifier(tmp_path / "model.onnx")
    output = tmp_path / "out" / "model.plan"
    assert main(["engine", "--onnx", str(model), "--precision", "int8", "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "a float model" in line and "`builder quantize --target gpu`" in line
    assert fake_gpu.built_configs == [] and not output.parent.exists()


def test_the_record_never_describes_a_plan_that_is_not_in_place(tiny_run, tmp_path, fake_gpu, monkeypatch):
    plan = tmp_path / "model.plan"
    build_engine(tiny_run / "model.onnx", plan)
    other_weights = retrained(tiny_run / "model.onnx", tmp_path / "other_weights.onnx")
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(target) == plan:
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        build_engine(other_weights, plan)
    monkeypatch.setattr(os, "replace", real_replace)
    try:
        info = read_engine_info(plan)
    except EngineError:
        return  # no record: publish refuses the plan until it is rebuilt
    assert info.get("plan_sha256") == _sha256(plan) and info["source_onnx_sha256"] == _sha256(tiny_run / "model.onnx")


# ------------------------------------------------------------------ what publish --plan checks


def _recorded_plan(folder: Path, onnx_path: Path, **record) -> Path:
    plan = folder / "model.plan"
    plan.write_bytes(b"serialized engine")
    info = {
        "tensorrt_version": "10.5.0.18",
        "compute_capability": "8.9",
        "min_batch": 1,
        "opt_batch": 8,
        "max_batch": 16,
        "source_onnx_sha256": _sha256(onnx_path),
        "plan_sha256": _sha256(plan),
        **record,
    }
    engine_info_path(plan).write_text(json.dumps(info))
    return plan


def _publish_plan_cli(plan: Path, onnx_path: Path, repository: Path, *extra: str) -> list[str]:
    return [
        "publish",
        "--plan",
        str(plan),
        "--onnx",
        str(onnx_path),
        "--repository",
        str(repository),
        "--name",
        "digits",
        "--compute-capability",
        "8.9",
        *extra,
    ]


@pytest.mark.parametrize(
    ("record", "extra", "message"),
    [
        ({"compute_capability": "9.0"}, (), "built for compute capability 9.0 but the serving GPU has 8.9"),
        ({"min_batch": 2}, (), "starts at batch 2"),
        (
            {"max_batch": 4},
            ("--preferred-batch-sizes", "4", "8"),
            "preferred batch sizes [8] exceed the plan's max batch 4",
        ),
        ({"max_batch": 16}, ("--preferred-batch-sizes", "4", "32"), "preferred batch sizes [32] exceed"),
        ({"source_onnx_sha256": "0" * 64}, (), "was not built from"),
        ({"plan_sha256": "0" * 64}, (), "does not describe"),
    ],
)
def test_publish_refuses_a_plan_that_would_fail_in_triton_with_one_line(
    tiny_run, tmp_path, capsys, record, extra, message
):
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx", **record)
    repository = tmp_path / "repo"
    assert main(_publish_plan_cli(plan, tiny_run / "model.onnx", repository, *extra)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line, line
    assert not repository.exists()


def test_a_plan_for_another_gpu_is_refused_against_this_machines_gpu_too(tiny_run, tmp_path, fake_gpu):
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx", compute_capability="9.0")
    with pytest.raises(PublishError, match="compute capability 9.0 but the serving GPU has 8.9"):
        publish_plan(plan, tiny_run / "model.onnx", tmp_path / "repo", "digits")


def test_without_a_gpu_here_publish_plan_asks_for_the_serving_gpus_compute_capability(tiny_run, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx")
    with pytest.raises(PublishError, match="--compute-capability"):
        publish_plan(plan, tiny_run / "model.onnx", tmp_path / "repo", "digits")
    assert not (tmp_path / "repo").exists()


def test_the_gpus_default_preferred_batch_sizes_are_fitted_to_a_smaller_plan(tiny_run, tmp_path):
    plan = _recorded_plan(tmp_path, tiny_run / "model.onnx", max_batch=4)
    assert main(_publish_plan_cli(plan, tiny_run / "model.onnx", tmp_path / "repo")) == 0
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert (config.max_batch_size, config.dynamic_batching.preferred_batch_sizes) == (4, (4,))
