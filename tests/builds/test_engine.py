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
from tests.onnx_variants import retrained


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


def _validation_images(run_dir: Path, count: int) -> np.ndarray:
    from builder.data import load_run_dataset
    from builder.onnx_meta import read_onnx_meta
    from builder.transforms import calibration_images

    meta = read_onnx_meta(run_dir / "model.onnx")
    return calibration_images(load_run_dataset(meta.dataset_recipe), meta.preprocess, count, seed=1)


def _run_engine(plan: Path, info: dict, images: np.ndarray) -> np.ndarray:
    """The plan deserialized by TensorRT's runtime and run once on `images` (TensorRT 10 tensor API)."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None, f"{plan} does not deserialize"
    context = engine.create_execution_context()
    inputs = torch.from_numpy(np.ascontiguousarray(images)).cuda()
    context.set_input_shape(info["input"], tuple(inputs.shape))
    dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[engine.get_tensor_dtype(info["output"])]
    outputs = torch.empty(tuple(context.get_tensor_shape(info["output"])), dtype=dtype, device="cuda")
    context.set_tensor_address(info["input"], inputs.data_ptr())
    context.set_tensor_address(info["output"], outputs.data_ptr())
    stream = torch.cuda.current_stream()  # the one the input copy was queued on
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outputs.float().cpu().numpy()


@pytest.mark.skipif(not _gpu_and_tensorrt(), reason="needs an NVIDIA GPU and the tensorrt package")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_built_engine_deserializes_and_answers_like_onnx_runtime(tiny_run, tmp_path, precision):
    import onnxruntime as ort

    from builder.engine import engine_from_onnx

    plan = engine_from_onnx(
        tiny_run / "model.onnx",
        tmp_path / "model.plan",
        EngineConfig(precision=precision, calibration_images=32, opt_batch=8, max_batch=16),
    )
    info = read_engine_info(plan)
    assert info["precision"] == precision and "." in info["compute_capability"]
    assert info["tensorrt_version"].startswith("10.5.")
    images = _validation_images(tiny_run, 16)
    session = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    agree = total = 0
    for batch in (1, 16):  # both ends of the optimization profile
        expected = session.run(None, {info["input"]: images[:batch]})[0]
        answered = _run_engine(plan, info, images[:batch])
        assert answered.shape == expected.shape and np.isfinite(answered).all()
        if precision == "fp16":
            np.testing.assert_allclose(answered, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))
        agree += int((answered.argmax(1) == expected.argmax(1)).sum())
        total += batch
    assert agree >= (total if precision == "fp16" else int(0.9 * total)), f"top-1 agreement {agree}/{total}"


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
# consults the INT8 calibrator's cache the way TensorRT does (read first; calibrate and write only on a miss).


class _FakeTensorRT(types.ModuleType):
    def __init__(self, version: str = "10.5.0.18") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calibration_reads: list[bytes | None] = []
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
            int8_calibrator = None

            def set_memory_pool_limit(self, pool, size) -> None:
                pass

            def set_flag(self, flag) -> None:
                pass

            def add_optimization_profile(self, profile) -> int:
                return 0

            def set_calibration_profile(self, profile) -> None:
                pass

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
                calibrator = config.int8_calibrator
                if calibrator is not None:
                    cached = calibrator.read_calibration_cache()
                    fake.calibration_reads.append(None if cached is None else bytes(cached))
                    if cached is None:
                        calibrator.write_calibration_cache(f"scales of build {len(fake.calibration_reads)}".encode())
                return b"serialized engine for " + network.get_input(0).name.encode()

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        self.Logger, self.OnnxParser, self.Builder = Logger, OnnxParser, Builder
        self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
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


def test_a_calibration_cache_is_reused_only_for_the_same_model_and_images(tiny_run, tmp_path, fake_gpu):
    images = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    config = EngineConfig(precision="int8", opt_batch=8)
    plan = tmp_path / "model.plan"
    build_engine(tiny_run / "model.onnx", plan, config, images)
    build_engine(tiny_run / "model.onnx", plan, config, images)
    assert fake_gpu.calibration_reads == [None, b"scales of build 1"]  # the same model and data: reused
    other_weights = retrained(tiny_run / "model.onnx", tmp_path / "other_weights.onnx")
    build_engine(other_weights, plan, config, images)
    assert fake_gpu.calibration_reads[-1] is None  # retrained: calibrated anew, not the old model's scales
    build_engine(other_weights, plan, config, images[::-1].copy())
    assert fake_gpu.calibration_reads[-1] is None  # other calibration images: calibrated anew


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
