import json

import pytest
import yaml

from builder import model_config
from builder.build import BuildConfig, build
from builder.cli import main
from builder.errors import BuilderError
from builder.report import BudgetError

QUICK_PRUNE = {"keep_ratio": 0.6, "steps": 1, "finetune_epochs": 0.2, "increments": 40}


def test_build_from_a_yaml_file_prunes_quantizes_publishes_and_reports_every_stage(tiny_run, tmp_path, capsys):
    settings = {
        "name": "digits", "out_dir": str(tmp_path / "build"), "checkpoint": str(tiny_run / "best.pt"),
        "prune": QUICK_PRUNE, "quantize": {"calibration_images": 32},
        "publish": {"repository": str(tmp_path / "repo"), "keep": 2}, "max_accuracy_drop": 100,
        "benchmark_seconds": 0.05, "parity_images": 8,
    }
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(settings))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 0
    out = tmp_path / "build"
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "pruned", "int8"]
    fp32, pruned, int8 = report["stages"]
    assert pruned["macs"] <= 0.6 * fp32["macs"] and int8["file_bytes"] < pruned["file_bytes"]
    assert int8["change"]["throughput_speedup"] > 0 and report["failed_stage"] is None
    assert "| int8 |" in (out / "report.md").read_text() and (out / "report.png").is_file()
    config = model_config.parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert json.loads((tmp_path / "repo" / "digits" / "1" / "build.json").read_text())["onnx_metadata"]["precision"] == "int8"
    assert json.loads(capsys.readouterr().out)["published_version"] == 1


def test_a_stage_over_the_accuracy_budget_stops_the_build_before_publishing(tiny_run, tmp_path):
    config = BuildConfig(name="digits", out_dir=tmp_path / "build", checkpoint=tiny_run / "best.pt",
                         prune={"keep_ratio": 0.1, "steps": 1, "finetune_epochs": 0, "increments": 40}, quantize=None,
                         publish={"repository": str(tmp_path / "repo")}, max_accuracy_drop=1.0,
                         benchmark_seconds=0.05, parity_images=8)
    with pytest.raises(BudgetError, match="stage 'pruned' lost"):
        build(config)
    assert not (tmp_path / "repo").exists()
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["failed_stage"] == "pruned" and "FAILED at stage `pruned`" in (tmp_path / "build" / "report.md").read_text()


def test_unknown_build_settings_are_named_with_the_valid_ones(tmp_path):
    (tmp_path / "build.yaml").write_text("name: x\nprunning: {}\n")
    with pytest.raises(BuilderError, match="unknown build settings prunning; valid: .*prune"):
        BuildConfig.from_yaml(tmp_path / "build.yaml")


def test_a_stage_can_be_switched_off_in_yaml(tmp_path):
    (tmp_path / "build.yaml").write_text("prune: false\nquantize:\n")
    config = BuildConfig.from_yaml(tmp_path / "build.yaml")
    assert config.prune is None and config.quantize == {}
