import importlib.util
import json

import pytest

from builder import model_config
from builder.cli import main
from builder.engine import EngineConfig, EngineError, build_engine, engine_info_path
from builder.errors import PublishError
from builder.publish import PublishSettings, publish_plan


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


@pytest.mark.skipif(not _gpu_and_tensorrt(), reason="needs an NVIDIA GPU and the tensorrt package")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_is_built_with_its_tensorrt_version_and_compute_capability_recorded(tiny_run, tmp_path, precision):
    from builder.engine import engine_from_onnx

    plan = engine_from_onnx(tiny_run / "model.onnx", tmp_path / "model.plan",
                            EngineConfig(precision=precision, calibration_images=32))
    info = json.loads(engine_info_path(plan).read_text())
    assert plan.stat().st_size > 0 and info["precision"] == precision
    assert info["tensorrt_version"] and "." in info["compute_capability"]


def test_bad_batch_profile_is_refused():
    with pytest.raises(EngineError, match="min batch <= opt batch <= max batch"):
        EngineConfig(min_batch=8, opt_batch=4)


def _fake_plan(folder, version):
    plan = folder / "model.plan"
    plan.write_bytes(b"serialized engine")
    engine_info_path(plan).write_text(json.dumps({"tensorrt_version": version, "compute_capability": "9.0",
                                                  "max_batch": 16}))
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
    plan = _fake_plan(tmp_path, "10.5.0.18")
    published = publish_plan(plan, tiny_run / "model.onnx", tmp_path / "repo", "digits",
                             settings=PublishSettings(target="gpu", max_batch_size=32, preferred_batch_sizes=(4, 8)))
    assert sorted(p.name for p in published.version_dir.iterdir()) == ["build.json", "model.plan"]
    config = model_config.parse((published.model_dir / "config.pbtxt").read_text())
    assert (config.platform, config.backend, config.instance_kind) == ("tensorrt_plan", "tensorrt", "KIND_GPU")
    assert config.cuda_graphs and config.max_batch_size == 16 and not config.gpu_accelerators


def test_the_cli_publishes_a_plan_for_the_gpu_without_being_told(tiny_run, tmp_path):
    from builder.cli import main

    plan = _fake_plan(tmp_path, "10.5.0")
    common = ["publish", "--plan", str(plan), "--onnx", str(tiny_run / "model.onnx"),
              "--repository", str(tmp_path / "repo")]
    assert main([*common, "--name", "digits"]) == 0
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert (config.backend, config.instance_kind, config.instance_count) == ("tensorrt", "KIND_GPU", 1)
    assert not any(key.startswith("onnxruntime.") for key in config.parameters)
    # Asked for the CPU, a plan is refused with one line and nothing is written.
    assert main([*common, "--name", "cpu", "--target", "cpu"]) == 2
    assert not (tmp_path / "repo" / "cpu").exists()
