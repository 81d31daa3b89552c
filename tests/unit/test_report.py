import io
import json

import pytest
from rich.console import Console

from builder.errors import BudgetError
from builder.report import Report, StageMetrics, to_markdown, write_report


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
