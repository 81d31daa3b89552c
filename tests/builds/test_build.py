import json

import pytest
import yaml

from builder import model_config
from builder.build import BuildConfig, build
from builder.cli import main
from builder.errors import BudgetError, BuilderError
from builder.onnx_meta import read_metadata
from builder.publish import PublishSettings, publish
from builder.quantize import QuantizeConfig

QUICK_PRUNE = {"keep_ratio": 0.6, "steps": 1, "finetune_epochs": 0.2, "increments": 40}


@pytest.mark.slow
def test_build_from_a_yaml_file_prunes_quantizes_publishes_and_reports_every_stage(tiny_run, tmp_path, capsys):
    settings = {
        "name": "digits",
        "out_dir": str(tmp_path / "build"),
        "checkpoint": str(tiny_run / "best.pt"),
        "prune": QUICK_PRUNE,
        "quantize": {"calibration_images": 32},
        "publish": {"repository": str(tmp_path / "repo"), "keep": 2},
        "max_accuracy_drop": 100,
        "benchmark_seconds": 0.05,
        "parity_images": 8,
    }
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(settings))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 0
    out = tmp_path / "build"
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "pruned", "int8"]
    fp32, pruned, int8 = report["stages"]
    assert pruned["macs"] <= 0.6 * fp32["macs"] and int8["file_bytes"] < pruned["file_bytes"]
    assert report["failed_stage"] is None
    # Each stage's change is against the stage before it, from the figures measured for both.
    for before, after in ((fp32, pruned), (pruned, int8)):
        assert after["change"]["throughput_speedup"] == pytest.approx(after["throughput_b8"] / before["throughput_b8"])
        assert after["change"]["file_ratio"] == pytest.approx(after["file_bytes"] / before["file_bytes"])
        assert after["change"]["top1_points"] == pytest.approx(100 * (after["top1"] - before["top1"]))
    assert "| int8 |" in (out / "report.md").read_text() and (out / "report.png").is_file()
    # Each stage's file records the top-1 the build measured on it (what publish and degrade compare).
    for stage, name in ((fp32, "fp32"), (pruned, "pruned"), (int8, "int8")):
        assert float(read_metadata(out / f"{name}.onnx")["val_accuracy"]) == pytest.approx(stage["top1"], abs=1e-6)
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert (
        json.loads((tmp_path / "repo" / "digits" / "1" / "build.json").read_text())["onnx_metadata"]["precision"]
        == "int8"
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["published_version"] == 1 and summary["published_from"] == str(out / "int8.onnx")
    # The trained FP32 model beside it, as the served model's reference: gateways compare answers with it.
    assert config.parameters["reference.model"] == "digits-reference"
    assert json.loads((out / "published.json").read_text())["reference"] == "digits-reference"
    reference = tmp_path / "repo" / "digits-reference"
    assert json.loads((reference / "1" / "build.json").read_text())["source_onnx"] == str(out / "fp32.onnx")
    reference_config = model_config.parse((reference / "config.pbtxt").read_text())
    assert reference_config.parameters["labels"] == config.parameters["labels"]
    # A version published by hand later keeps the model's reference.
    publish(out / "int8.onnx", tmp_path / "repo", "digits", settings=PublishSettings(force=True))
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert config.parameters["reference.model"] == "digits-reference"


@pytest.mark.slow
def test_a_stage_over_the_accuracy_budget_stops_the_build_before_publishing(tiny_run, tmp_path):
    config = BuildConfig(
        name="digits",
        out_dir=tmp_path / "build",
        checkpoint=tiny_run / "best.pt",
        prune={"keep_ratio": 0.1, "steps": 1, "finetune_epochs": 0, "increments": 40},
        quantize=None,
        publish={"repository": str(tmp_path / "repo")},
        max_accuracy_drop=1.0,
        benchmark_seconds=0.05,
        parity_images=8,
    )
    with pytest.raises(BudgetError, match="stage 'pruned' lost"):
        build(config)
    assert not (tmp_path / "repo").exists()
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert (
        report["failed_stage"] == "pruned"
        and "FAILED at stage `pruned`" in (tmp_path / "build" / "report.md").read_text()
    )


def test_unknown_build_settings_are_named_with_the_valid_ones(tmp_path):
    (tmp_path / "build.yaml").write_text("name: x\nprunning: {}\n")
    with pytest.raises(BuilderError, match="unknown build settings prunning; valid: .*prune"):
        BuildConfig.from_yaml(tmp_path / "build.yaml")


def test_a_stage_can_be_switched_off_in_yaml(tmp_path):
    (tmp_path / "build.yaml").write_text("prune: false\nquantize:\n")
    config = BuildConfig.from_yaml(tmp_path / "build.yaml")
    assert config.prune is None and config.quantize == QuantizeConfig()


# ---- quantization-aware training in the build ----

QUICK_QAT = {"epochs": 0.3, "parity_images": 128}


def _flip_classifier(onnx_path):
    """Negate the int8 weights of the final Gemm: the file still runs, but ranks classes backwards."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    weight_name = producers[gemm.input[1]].input[0] if gemm.input[1] in producers else gemm.input[1]
    for initializer in proto.graph.initializer:
        if initializer.name == weight_name:
            weight = numpy_helper.to_array(initializer)
            flipped = np.negative(weight.astype(np.int16)).clip(np.iinfo(weight.dtype).min, np.iinfo(weight.dtype).max)
            initializer.CopyFrom(numpy_helper.from_array(flipped.astype(weight.dtype), initializer.name))
    onnx.save(proto, str(onnx_path))


@pytest.fixture
def static_int8_loses_accuracy(monkeypatch):
    """Static INT8 that really is over the budget: the real quantizer's file with its classifier ranking backwards."""
    import builder.build as build_module

    real = build_module.quantize_int8

    def quantize_int8(*args, **kwargs):
        result = real(*args, **kwargs)
        _flip_classifier(result.onnx_path)
        return result

    monkeypatch.setattr(build_module, "quantize_int8", quantize_int8)


def _qat_build(tiny_run, tmp_path, qat, **quantize):
    return BuildConfig(
        name="digits",
        out_dir=tmp_path / "build",
        checkpoint=tiny_run / "best.pt",
        prune=None,
        quantize={"calibration_images": 32, **quantize},
        qat={"mode": qat, **QUICK_QAT},
        publish={"repository": str(tmp_path / "repo")},
        max_accuracy_drop=5.0,
        benchmark_seconds=0.05,
        parity_images=8,
    )


@pytest.mark.slow
def test_build_with_qat_always_runs_qat_instead_of_static_int8_and_publishes_it(tiny_run, tmp_path):
    result = build(_qat_build(tiny_run, tmp_path, "always"))
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8-qat"]
    assert report["failed_stage"] is None and "QAT 0.3 epochs from best.pt" in report["stages"][1]["notes"]
    assert result.final_onnx == tmp_path / "build" / "int8-qat.onnx" and not (tmp_path / "build" / "int8.onnx").exists()
    assert "| int8-qat |" in (tmp_path / "build" / "report.md").read_text()
    lineage = json.loads((result.published.version_dir / "build.json").read_text())
    assert lineage["onnx_metadata"]["precision"] == "int8" and lineage["onnx_metadata"]["quantization"] == "qat"


@pytest.mark.slow
def test_build_with_qat_auto_falls_back_to_qat_when_static_int8_is_over_the_budget(
    tiny_run, tmp_path, static_int8_loses_accuracy
):
    result = build(_qat_build(tiny_run, tmp_path, "auto"))
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8", "int8-qat"]
    fp32, static, qat = report["stages"]
    assert static["accuracy_drop_points"] > 5.0 and "over the budget" in static["notes"]
    assert qat["accuracy_drop_points"] <= 5.0 and "static int8 lost" in qat["notes"]
    assert static["superseded"] and not qat["superseded"]
    # The QAT row's changes are against the stage it improves on (fp32), not the replaced static row.
    assert qat["change"]["top1_points"] == pytest.approx(100 * (qat["top1"] - fp32["top1"]))
    markdown = (tmp_path / "build" / "report.md").read_text()
    assert "- `int8`: over the budget" in markdown and "- `int8-qat`: static int8 lost" in markdown
    assert report["failed_stage"] is None and report["failure"] is None
    assert result.final_onnx.name == "int8-qat.onnx" and result.published.version == 1
    lineage = json.loads((result.published.version_dir / "build.json").read_text())
    assert lineage["onnx_metadata"]["quantization"] == "qat"


@pytest.mark.slow
def test_build_with_qat_auto_fails_when_qat_is_over_the_budget_too(
    tiny_run, tmp_path, monkeypatch, static_int8_loses_accuracy
):
    import builder.build as build_module

    real = build_module.quantization_aware_train

    def quantization_aware_train(*args, **kwargs):
        result = real(*args, **kwargs)
        _flip_classifier(result.onnx_path)
        return result

    monkeypatch.setattr(build_module, "quantization_aware_train", quantization_aware_train)
    with pytest.raises(BudgetError, match="stage 'int8-qat' lost"):
        build(_qat_build(tiny_run, tmp_path, "auto"))
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8", "int8-qat"]
    assert report["failed_stage"] == "int8-qat" and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_build_with_qat_never_fails_at_the_static_int8_stage(tiny_run, tmp_path, static_int8_loses_accuracy):
    with pytest.raises(BudgetError, match="stage 'int8' lost"):
        build(_qat_build(tiny_run, tmp_path, "never"))
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8"] and report["failed_stage"] == "int8"
    assert not (tmp_path / "build" / "int8-qat.onnx").exists()


@pytest.mark.parametrize(
    "quantize, message",
    [
        ({"qat": "sometimes"}, "qat: mode 'sometimes' is not one of auto, always, never"),
        ({"qat_epoch": 1}, "quantize: qat_epoch: QAT settings are a section of their own now, qat:"),
        ({"qat_epochs": 0}, "quantize: qat_epochs: QAT settings are a section of their own now, qat:"),
    ],
)
def test_bad_qat_build_settings_are_one_line_cli_errors(quantize, message, tmp_path, capsys):
    (tmp_path / "build.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "build"), "quantize": quantize}))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("builder build: error:") and "\n" not in err
    import re

    assert re.search(message, err)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"qat": {"mode": "sometimes"}}, "qat: mode 'sometimes' is not one of auto, always, never"),
        ({"qat": {"epoch": 1}}, "unknown qat settings epoch; valid: epochs, lr, .*mode"),
        ({"qat": {"epochs": 0}}, "QAT epochs must be more than 0"),
        ({"qat": "sometimes"}, "qat: mode 'sometimes' is not one of auto, always, never"),
        ({"qat_epochs": 1}, "qat_epochs: QAT settings are the qat: section"),
        ({"train": 5}, "train: 5 is not a mapping of settings"),
        ({"train": {"image_sise": 16}}, "unknown train settings image_sise; valid: .*image_size"),
        ({"publish": [1]}, r"publish: \[1\] is not a mapping of settings"),
    ],
)
def test_bad_qat_sections_are_one_line_cli_errors(settings, message, tmp_path, capsys):
    (tmp_path / "build.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "build"), **settings}))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("builder build: error:") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "build").exists()  # nothing written


def test_build_file_sections_are_typed_settings(tmp_path):
    from builder.build import QATSection
    from builder.prune import PruneConfig
    from builder.publish import PublishSettings
    from builder.train_config import TrainConfig

    (tmp_path / "build.yaml").write_text(
        "train: {arch: resnet50, epochs: 2}\nprune: {keep_ratio: 0.4}\nqat: {mode: always, epochs: 0.5}\n"
        "publish: {repository: my-repo, keep: 3}\n"
    )
    config = BuildConfig.from_yaml(tmp_path / "build.yaml")
    assert config.train == TrainConfig(arch="resnet50", epochs=2)
    assert config.prune == PruneConfig(keep_ratio=0.4) and config.quantize == QuantizeConfig()
    assert config.qat == QATSection(mode="always", epochs=0.5) and config.qat.training().epochs == 0.5
    assert config.publish == PublishSettings(keep=3) and str(config.repository) == "my-repo"
    # The mode where earlier build files give it, in the quantize section, and the short form.
    assert BuildConfig.from_mapping({"quantize": {"qat": "never"}}).qat.mode == "never"
    assert BuildConfig.from_mapping({"qat": "always"}).qat.mode == "always"


def test_a_gpu_publish_target_is_the_quantize_sections_default_target():
    from builder.build import BuildOverrides

    assert BuildConfig.from_mapping({"publish": {"target": "gpu"}}).quantize.target == "gpu"
    assert BuildConfig(publish={"target": "gpu"}).quantize.target == "gpu"
    # Overridden on the command line, the target's own defaults apply (one instance per GPU, not the CPU's two).
    config = BuildConfig.from_mapping({"publish": {"keep": 2}}, BuildOverrides(target="gpu"))
    assert (config.publish.target, config.publish.instance_count, config.publish.keep) == ("gpu", 1, 2)
    assert config.quantize.target == "gpu" and config.qat.mode == "auto"


def test_command_line_overrides_change_only_the_stages_that_run():
    from builder.build import BuildOverrides

    data = {
        "train": {"arch": "resnet50"},
        "prune": False,
        "quantize": {"calibration_images": 64},
        "publish": {"repository": "a"},
    }
    config = BuildConfig.from_mapping(
        data, BuildOverrides(epochs=3, keep_ratio=0.3, calibration_images=8, repository="b", max_accuracy_drop=2.0)
    )
    assert (config.train.arch, config.train.epochs) == ("resnet50", 3)
    assert config.prune is None and config.quantize.calibration_images == 8
    assert str(config.repository) == "b" and config.max_accuracy_drop == 2.0
    config = BuildConfig.from_mapping(data, BuildOverrides(no_quantize=True, no_publish=True))
    assert config.quantize is None and config.publish is None
    assert BuildConfig.from_mapping({}, BuildOverrides(repository="r")).publish == BuildConfig(publish={}).publish


def test_the_build_settings_written_beside_the_report_read_back_the_same():
    config = BuildConfig.from_mapping(
        {
            "train": {"mean": [0.5], "std": [0.25], "dataset": "digits"},
            "prune": False,
            "qat": {"mode": "never"},
            "publish": {"repository": "r", "target": "gpu"},
        }
    )
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    assert BuildConfig.from_mapping(yaml.safe_load(text)) == config


@pytest.mark.slow
def test_build_for_a_gpu_target_measures_and_gates_the_tensorrt_int8(tiny_run, tmp_path):
    config = BuildConfig(
        name="digits",
        out_dir=tmp_path / "build",
        checkpoint=tiny_run / "best.pt",
        prune=None,
        quantize={"calibration_images": 32},
        publish={"repository": str(tmp_path / "repo"), "target": "gpu"},
        max_accuracy_drop=5.0,
        benchmark_seconds=0.05,
        parity_images=8,
    )
    result = build(config)
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["stages"][1]["accuracy_drop_points"] <= 5.0 and report["failed_stage"] is None
    assert result.final_onnx == tmp_path / "build" / "int8-gpu.onnx"
    assert not (tmp_path / "build" / "int8.onnx").exists()
    import onnx

    from builder.onnx_meta import read_metadata
    from builder.quantize import tensorrt_parser_problems
    from builder.trt_runtime import tensorrt_unavailable

    assert tensorrt_parser_problems(onnx.load(str(result.final_onnx))) == []
    assert read_metadata(result.final_onnx)["target"] == "gpu"
    markdown = (tmp_path / "build" / "report.md").read_text()
    published = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    reason = tensorrt_unavailable()
    if reason is None:  # a GPU with TensorRT 10.5: both engines measured, the chosen plan published
        stages = [s["stage"] for s in report["stages"]]
        assert stages == ["fp32", "int8-gpu", "engine-fp16", "engine-int8"] and report["not_run"] == []
        assert report["engine_choice"]["stage"] == result.published_engine in ("engine-fp16", "engine-int8")
        assert all(s["max_batch"] == 32 and s["throughput_max_batch"] > 0 for s in report["stages"][2:])
        assert published.platform == "tensorrt_plan"
        return
    # Here (no GPU, or no TensorRT 10.5): both engine stages listed as not run, with the reason and what to install.
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8-gpu"]
    assert report["not_run"] == [{"stage": "engine-fp16", "reason": reason}, {"stage": "engine-int8", "reason": reason}]
    assert "pip install 'tensorrt==10.5.*'" in reason or "no CUDA device" in reason
    assert f"- `engine-fp16`: {reason}" in markdown and f"- `engine-int8`: {reason}" in markdown
    assert report["engine_choice"]["stage"] is None and "no engine stage ran here" in markdown
    # ... and the build still publishes what it did before: the float ONNX for TensorRT in Triton.
    assert result.published_engine is None and published.platform != "tensorrt_plan"
    assert result.published_from == tmp_path / "build" / "fp32.onnx"
    published_json = json.loads((tmp_path / "build" / "published.json").read_text())
    assert published_json["engine"] is None
    assert published_json["reference"] is None  # what is served is the trained FP32 model itself


def _negate_classifier_weight(onnx_path):
    """The final Gemm's weight, found through its Q/DQ chain, negated: the classes rank backwards."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    initializers = {i.name: i for i in proto.graph.initializer}
    name = next(n for n in proto.graph.node if n.op_type == "Gemm").input[1]
    while name not in initializers:
        name = producers[name].input[0]
    weight = numpy_helper.to_array(initializers[name])
    initializers[name].CopyFrom(numpy_helper.from_array(-weight, name))
    onnx.save(proto, str(onnx_path))


@pytest.mark.slow
def test_build_gates_the_gpu_int8_like_every_stage(tiny_run, tmp_path, monkeypatch):
    import builder.build as build_module

    real = build_module.quantize_int8

    def quantize_int8(*args, **kwargs):
        result = real(*args, **kwargs)
        _negate_classifier_weight(result.onnx_path)
        return result

    monkeypatch.setattr(build_module, "quantize_int8", quantize_int8)
    config = BuildConfig(
        name="digits",
        out_dir=tmp_path / "build",
        checkpoint=tiny_run / "best.pt",
        prune=None,
        quantize={"calibration_images": 32, "target": "gpu"},
        publish={"repository": str(tmp_path / "repo"), "target": "gpu"},
        max_accuracy_drop=5.0,
        benchmark_seconds=0.05,
        parity_images=8,
    )
    with pytest.raises(BudgetError, match="stage 'int8-gpu' lost"):
        build(config)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "build" / "int8-qat.onnx").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"quantize": {"qat": "always", "target": "gpu"}}, "qat writes ONNX Runtime's uint8 Q/DQ"),
        ({"quantize": {"target": "gpu"}, "publish": {"target": "cpu"}}, "target gpu writes INT8 for TensorRT"),
        ({"quantize": {"target": "gpu", "method": "percentile"}}, "not available for the GPU INT8"),
    ],
)
def test_gpu_int8_build_settings_that_cannot_work_are_one_line_cli_errors(settings, message, tmp_path, capsys):
    (tmp_path / "build.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "build"), **settings}))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("builder build: error:") and "\n" not in err and message in err


def test_what_a_build_publishes_is_held_to_the_builds_own_accuracy_budget(tiny_run, tmp_path, monkeypatch):
    import builder.build as build_module

    budgets = []

    def publish(onnx_path, repository, name, *, settings):
        budgets.append(settings.max_accuracy_drop)
        raise BuilderError("stopped here: the budget is what this test reads")

    monkeypatch.setattr(build_module, "publish", publish)
    config = BuildConfig(
        name="digits",
        out_dir=tmp_path / "build",
        checkpoint=tiny_run / "best.pt",
        prune=None,
        quantize=None,
        publish={"repository": str(tmp_path / "repo")},
        max_accuracy_drop=7.5,
        benchmark_seconds=0.05,
        parity_images=8,
    )
    with pytest.raises(BuilderError, match="stopped here"):
        build(config)
    assert budgets == [7.5]
