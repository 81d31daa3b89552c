import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from builder.errors import BudgetError
from builder.report import EngineChoice, NotRun, Report, StageMetrics, choose_engine, to_markdown, write_report


def metrics(stage, top1, throughput, size, macs=100):
    return StageMetrics(
        stage=stage,
        artifact=f"{stage}.onnx",
        parameters=10,
        macs=macs,
        file_bytes=size,
        top1=top1,
        latency_b1_ms=1000 / throughput,
        throughput_b8=throughput,
    )


def test_changes_are_against_the_previous_stage_and_drops_against_the_first():
    report = Report()
    for m in (
        metrics("fp32", 0.95, 100, 4000),
        metrics("pruned", 0.945, 200, 2000, 50),
        metrics("int8", 0.94, 600, 500, 50),
    ):
        report.add(m)
    fp32, pruned, int8 = report.rows()
    assert "change" not in fp32
    assert pruned["change"]["throughput_speedup"] == 2.0 and pruned["change"]["macs_ratio"] == 0.5
    assert int8["change"]["throughput_speedup"] == 3.0 and int8["change"]["file_ratio"] == 0.25
    assert int8["accuracy_drop_points"] == pytest.approx(1.0)


def test_a_stage_over_the_accuracy_budget_fails_and_the_report_names_it(tmp_path):
    report = Report(max_accuracy_drop=1.0)
    report.add(metrics("fp32", 0.95, 100, 4000))
    report.check_budget(report.stages[0])
    report.add(metrics("int8", 0.90, 600, 500))
    with pytest.raises(BudgetError, match="stage 'int8' lost 5.00 points"):
        report.check_budget(report.stages[1])
    paths = write_report(report, tmp_path)
    assert "FAILED at stage `int8`" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["failed_stage"] == "int8"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_markdown_has_one_row_per_stage():
    report = Report()
    report.add(metrics("fp32", 0.9, 100, 4000))
    report.add(metrics("int8", 0.9, 300, 1000))
    table = [line for line in to_markdown(report).splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["stage", "fp32", "int8"]
    assert "3.00x" in table[2]


def three_stages():
    report = Report()
    for m in (
        metrics("fp32", 0.95, 100, 4000),
        metrics("pruned", 0.945, 200, 2000, 50),
        metrics("int8", 0.94, 600, 500, 50),
    ):
        report.add(m)
    return report


def test_speed_ups_are_given_against_the_previous_stage_and_against_fp32_labelled(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    report = three_stages()
    fp32, pruned, int8 = report.rows()
    assert int8["change"]["throughput_speedup"] == 3.0  # against pruned
    assert int8["vs_fp32"]["throughput_speedup"] == 6.0 and int8["vs_fp32"]["file_ratio"] == 0.125
    assert pruned["vs_fp32"]["throughput_speedup"] == 2.0 and "vs_fp32" not in fp32

    header = next(line for line in to_markdown(report).splitlines() if line.startswith("| stage"))
    assert "speed-up b8 vs previous" in header and "speed-up b8 vs fp32" in header
    int8_row = next(line for line in to_markdown(report).splitlines() if line.startswith("| int8"))
    assert "3.00x" in int8_row and "6.00x" in int8_row

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    screen = io.StringIO()
    paths = write_report(report, tmp_path, console=Console(file=screen, width=250))
    assert json.loads(paths["json"].read_text())["stages"][2]["vs_fp32"]["throughput_speedup"] == 6.0
    printed = screen.getvalue()
    assert "vs previous" in printed and "vs fp32" in printed and "6.00x" in printed
    labels = " ".join(text.get_text() for text in figures[-1].axes[0].texts)
    assert "3.00x vs previous" in labels and "6.00x vs fp32" in labels, labels


def engine(stage, top1, throughput, size=1000):
    measured = metrics(stage, top1, throughput, size)
    return replace(measured, runtime="TensorRT (a GPU)", max_batch=32, throughput_max_batch=throughput)


def test_the_engine_chosen_is_the_fastest_within_the_accuracy_budget():
    fp32 = metrics("fp32", 0.95, 100, 4000)
    fp16, int8 = engine("engine-fp16", 0.95, 3000), engine("engine-int8", 0.944, 5000)
    choice = choose_engine([fp16, int8], fp32, max_accuracy_drop=1.0)
    assert choice.stage == "engine-int8"
    assert "fastest engine within the accuracy budget of 1 points: 5000 img/s at batch 8" in choice.reason
    assert "0.60 points of top-1 lost" in choice.reason and "engine-fp16 3000 img/s" in choice.reason
    # INT8 faster but over the budget: FP16 is published, and the reason says why not INT8.
    choice = choose_engine([fp16, engine("engine-int8", 0.92, 5000)], fp32, max_accuracy_drop=1.0)
    assert choice.stage == "engine-fp16" and "engine-int8 lost 3.00 points, over the budget" in choice.reason
    # As fast: the smaller plan.
    assert choose_engine([fp16, engine("engine-int8", 0.95, 3000, size=400)], fp32, 1.0).stage == "engine-int8"
    # None within the budget, or none measured: no engine.
    none = choose_engine([engine("engine-fp16", 0.90, 3000)], fp32, 1.0)
    assert none.stage is None and "no engine is within the accuracy budget" in none.reason
    assert "engine-fp16 lost 5.00" in none.reason
    assert choose_engine([], fp32, 1.0).stage is None


def test_stages_not_run_and_the_engine_choice_are_in_every_report(tmp_path):
    report = Report()
    report.add(metrics("fp32", 0.95, 100, 4000))
    report.add(engine("engine-fp16", 0.95, 3000))
    reason = "no CUDA device (torch.cuda.is_available() is False)"
    report.not_run.append(NotRun("engine-int8", reason))
    report.engine_choice = EngineChoice("engine-fp16", "the only engine")
    screen = io.StringIO()
    paths = write_report(report, tmp_path, console=Console(file=screen, width=250))
    markdown = paths["md"].read_text()
    assert f"- `engine-int8`: {reason}" in markdown
    assert "Engine to publish: `engine-fp16`: the only engine" in markdown
    assert "TensorRT (a GPU); 3000 img/s at batch 32, the profile's max" in markdown
    saved = json.loads(paths["json"].read_text())
    assert saved["not_run"] == [{"stage": "engine-int8", "reason": reason}]
    assert saved["engine_choice"] == {"stage": "engine-fp16", "reason": "the only engine"}
    assert saved["stages"][1]["max_batch"] == 32 and saved["stages"][1]["runtime"] == "TensorRT (a GPU)"
    assert "engine-int8" in screen.getvalue() and "Engine to publish" in screen.getvalue()
