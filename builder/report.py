"""What each stage cost and bought: a table in the terminal, report.md, report.json and report.png.

Every stage is measured the same way on this machine: the ONNX file it produced, scored by
`evaluate()` on the validation split and timed by `measure_speed()`; a TensorRT engine stage
(`measure_engine_stage`) the same way through `EngineRunner` on the GPU. Stages that could not run here
are listed with the reason, and `choose_engine` says which engine the build publishes, and why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import BudgetError
from .evaluate import (
    LATENCY_BATCH,
    THROUGHPUT_BATCH,
    ValidationData,
    _median_seconds,
    evaluate,
    evaluate_predictor,
    measure_speed,
)


@dataclass(frozen=True)
class StageMetrics:
    stage: str
    artifact: str
    parameters: int
    macs: int
    file_bytes: int
    top1: float
    latency_b1_ms: float
    throughput_b8: float  # images per second
    notes: str = ""
    superseded: bool = False  # measured, then replaced by a later stage (e.g. static INT8 by QAT)
    runtime: str = "ONNX Runtime (CPU)"
    max_batch: int | None = None  # an engine's: the top of its optimization profile
    throughput_max_batch: float | None = None  # images per second at max_batch


ENGINE_STAGES = ("engine-fp16", "engine-int8")


@dataclass(frozen=True)
class NotRun:
    """A stage the build would have run, and why it did not run here."""

    stage: str
    reason: str


@dataclass(frozen=True)
class EngineChoice:
    """The engine stage the build publishes (None: none), and why."""

    stage: str | None
    reason: str


def measure_stage(
    stage: str,
    onnx_path: Path,
    data: ValidationData,
    *,
    macs: int,
    parameters: int,
    confusion_png: Path | None = None,
    notes: str = "",
    benchmark_seconds: float = 1.5,
) -> StageMetrics:
    evaluation = evaluate(onnx_path, data, confusion_png=confusion_png)
    speed = measure_speed(onnx_path, min_seconds=benchmark_seconds)
    return StageMetrics(
        stage=stage,
        artifact=str(onnx_path),
        parameters=parameters,
        macs=macs,
        file_bytes=Path(onnx_path).stat().st_size,
        top1=evaluation.top1,
        latency_b1_ms=speed.latency_b1_ms,
        throughput_b8=speed.throughput_b8,
        notes=notes,
    )


def measure_engine_stage(
    stage: str,
    plan_path: Path,
    data: ValidationData,
    *,
    macs: int,
    parameters: int,
    confusion_png: Path | None = None,
    notes: str = "",
    benchmark_seconds: float = 1.5,
) -> StageMetrics:
    """A TensorRT plan measured like an ONNX stage, through `EngineRunner` on this machine's GPU: top-1 on the
    validation split, latency at batch 1, throughput at batch 8 and at the profile's max batch."""
    from .trt_runtime import EngineRunner

    runner = EngineRunner(Path(plan_path))
    low, _, high = runner.profile

    def predict(images: np.ndarray) -> np.ndarray:
        if len(images) >= low:
            return runner.infer(images)
        padded = np.concatenate([images, np.zeros((low - len(images), *images.shape[1:]), images.dtype)])
        return runner.infer(padded)[: len(images)]  # a last batch below the profile's min, padded up to it

    evaluation = evaluate_predictor(predict, data, confusion_png=confusion_png, batch_size=high)
    # Batch 1 and 8 as for the ONNX stages, moved into the profile if it excludes them, and its max.
    latency_batch, throughput_batch = max(LATENCY_BATCH, low), min(max(THROUGHPUT_BATCH, low), high)
    rng = np.random.default_rng(0)
    seconds = {}
    for batch in sorted({latency_batch, throughput_batch, high}):
        images = rng.standard_normal((batch, *runner.sample_shape)).astype(np.float32)
        # The same timing as the ONNX stages: median run after warm-up, host arrays in and out.
        seconds[batch] = _median_seconds(
            lambda images=images: runner.infer(images), min_seconds=benchmark_seconds, min_runs=10, warmup=3
        )
    import torch

    return StageMetrics(
        stage=stage,
        artifact=str(plan_path),
        parameters=parameters,
        macs=macs,
        file_bytes=Path(plan_path).stat().st_size,
        top1=evaluation.top1,
        latency_b1_ms=seconds[latency_batch] * 1000.0,
        throughput_b8=throughput_batch / seconds[throughput_batch],
        notes=notes,
        runtime=f"TensorRT ({torch.cuda.get_device_name()})",
        max_batch=high,
        throughput_max_batch=high / seconds[high],
    )


def choose_engine(engines: Sequence[StageMetrics], baseline: StageMetrics, max_accuracy_drop: float) -> EngineChoice:
    """The engine to publish: the fastest (throughput at batch 8; the smaller file on a tie) of those within
    `max_accuracy_drop` top-1 points of `baseline`; none when no engine is within it."""
    if not engines:
        return EngineChoice(None, "no engine stage ran")
    drops = {m.stage: 100.0 * (baseline.top1 - m.top1) for m in engines}
    within = [m for m in engines if drops[m.stage] <= max_accuracy_drop]
    budget = f"the accuracy budget of {max_accuracy_drop:g} points"
    if not within:
        lost = ", ".join(f"{m.stage} lost {drops[m.stage]:.2f}" for m in engines)
        return EngineChoice(None, f"no engine is within {budget} ({lost})")
    best = max(within, key=lambda m: (m.throughput_b8, -m.file_bytes))
    reason = (
        f"the fastest engine within {budget}: {best.throughput_b8:.0f} img/s at batch 8, "
        f"{drops[best.stage]:.2f} points of top-1 lost"
    )
    others = [
        f"{m.stage} {m.throughput_b8:.0f} img/s"
        if drops[m.stage] <= max_accuracy_drop
        else f"{m.stage} lost {drops[m.stage]:.2f} points, over the budget"
        for m in engines
        if m is not best
    ]
    return EngineChoice(best.stage, reason + (f" ({'; '.join(others)})" if others else ""))


@dataclass
class Report:
    stages: list[StageMetrics] = field(default_factory=list)
    max_accuracy_drop: float = 1.0  # percentage points below the first stage
    failed_stage: str | None = None
    failure: str | None = None
    not_run: list[NotRun] = field(default_factory=list)
    engine_choice: EngineChoice | None = None  # builds for a GPU: which engine is published, and why
    # Top-1 with the gateway's exact and reduced-scale JPEG decoding (`evaluate.DecodeComparison.to_dict`,
    # with "applies" and "model"), or why it does not apply ("applies": false, "reason"); None: not measured.
    gateway_decode: dict | None = None

    def add(self, metrics: StageMetrics) -> None:
        self.stages.append(metrics)

    def accuracy_drop(self, metrics: StageMetrics) -> float:
        """Points of top-1 lost against the first (trained) stage."""
        return 100.0 * (self.stages[0].top1 - metrics.top1) if self.stages else 0.0

    def check_budget(self, metrics: StageMetrics) -> None:
        drop = self.accuracy_drop(metrics)
        if drop > self.max_accuracy_drop:
            self.failed_stage = metrics.stage
            self.failure = (
                f"stage {metrics.stage!r} lost {drop:.2f} points of top-1 "
                f"({100 * self.stages[0].top1:.2f}% -> {100 * metrics.top1:.2f}%), more than the "
                f"budget of {self.max_accuracy_drop:g}; not publishing (raise --max-accuracy-drop "
                f"or change the stage's settings)"
            )
            raise BudgetError(self.failure)

    def rows(self) -> list[dict]:
        """One dict per stage: its metrics, "change" against the previous stage and "vs_fp32" against the
        first (the trained FP32 model), the two bases a speed-up can have."""
        rows, previous = [], None
        for metrics in self.stages:
            row = asdict(metrics)
            if previous is not None:
                row["change"] = _changes(metrics, previous)
                row["vs_fp32"] = _changes(metrics, self.stages[0])
            row["accuracy_drop_points"] = self.accuracy_drop(metrics)
            rows.append(row)
            # A stage the build replaced is not what the next one improves on.
            previous = previous if metrics.superseded and previous is not None else metrics
        return rows

    def to_dict(self) -> dict:
        return {
            "max_accuracy_drop_points": self.max_accuracy_drop,
            "failed_stage": self.failed_stage,
            "failure": self.failure,
            "stages": self.rows(),
            "not_run": [asdict(n) for n in self.not_run],
            "engine_choice": asdict(self.engine_choice) if self.engine_choice else None,
            "gateway_decode": self.gateway_decode,
        }


def _changes(metrics: StageMetrics, base: StageMetrics) -> dict:
    return {
        "top1_points": 100.0 * (metrics.top1 - base.top1),
        "parameters_ratio": _ratio(metrics.parameters, base.parameters),
        "macs_ratio": _ratio(metrics.macs, base.macs),
        "file_ratio": _ratio(metrics.file_bytes, base.file_bytes),
        "latency_speedup": _ratio(base.latency_b1_ms, metrics.latency_b1_ms),
        "throughput_speedup": _ratio(metrics.throughput_b8, base.throughput_b8),
    }


def _ratio(new: float, old: float) -> float | None:
    return new / old if old else None


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _change(row: dict, key: str, fmt: str, base: str = "change") -> str:
    value = row.get(base, {}).get(key)
    return "" if value is None else fmt.format(value)


COLUMNS = (
    "stage",
    "params",
    "MACs",
    "file",
    "top-1",
    "Δtop-1 vs previous",
    "latency b1",
    "throughput b8",
    "speed-up b8 vs previous",
    "speed-up b8 vs fp32",
    "size vs previous",
    "size vs fp32",
)


def _cells(row: dict) -> list[str]:
    return [
        row["stage"],
        f"{row['parameters'] / 1e6:.2f} M",
        f"{row['macs'] / 1e6:.1f} M",
        _megabytes(row["file_bytes"]),
        f"{100 * row['top1']:.2f}%",
        _change(row, "top1_points", "{:+.2f} pt"),
        f"{row['latency_b1_ms']:.2f} ms",
        f"{row['throughput_b8']:.0f} img/s",
        _change(row, "throughput_speedup", "{:.2f}x"),
        _change(row, "throughput_speedup", "{:.2f}x", "vs_fp32"),
        _change(row, "file_ratio", "{:.2f}x"),
        _change(row, "file_ratio", "{:.2f}x", "vs_fp32"),
    ]


def rich_table(report: Report) -> Table:
    table = Table(
        title="What each stage cost and bought (validation split; ONNX Runtime, engines TensorRT, on this machine)"
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in report.rows():
        style = "bold red" if row["stage"] == report.failed_stage else None
        table.add_row(*_cells(row), style=style)
    return table


def _note(metrics: StageMetrics) -> str:
    if metrics.throughput_max_batch is None:
        return metrics.notes
    engine = (
        f"{metrics.runtime}; {metrics.throughput_max_batch:.0f} img/s at batch {metrics.max_batch}, the profile's max"
    )
    return f"{engine}. {metrics.notes}" if metrics.notes else engine


def notes_lines(report: Report) -> list[str]:
    noted = [m for m in report.stages if _note(m)]
    lines = ["", "Notes:", *(f"- `{m.stage}`: {_note(m)}" for m in noted)] if noted else []
    if report.not_run:
        lines += ["", "Not run here:", *(f"- `{n.stage}`: {n.reason}" for n in report.not_run)]
    if report.engine_choice is not None:
        stage = f"`{report.engine_choice.stage}`" if report.engine_choice.stage else "none"
        lines += ["", f"Engine to publish: {stage}: {report.engine_choice.reason}"]
    if report.gateway_decode is not None:
        lines += ["", f"Gateway decode: {gateway_decode_line(report.gateway_decode)}"]
    return lines


def gateway_decode_line(decode: dict) -> str:
    """One line on the gateway's reduced-scale JPEG decoding for the published model."""
    if not decode.get("applies"):
        return str(decode.get("reason", "not measured"))
    drop = 100 * (decode["exact_top1"] - decode["reduced_top1"])
    verdict = "allowed" if decode["reduced_scale"] else "not allowed"
    return (
        f"`{decode['model']}` top-1 {100 * decode['exact_top1']:.2f}% exact, {100 * decode['reduced_top1']:.2f}% "
        f"at reduced scale ({drop:.2f} points lost, budget {decode['max_accuracy_drop']:g}) on "
        f"{decode['images']} images ({decode['jpeg_images']} JPEG): reduced-scale decoding {verdict}"
    )


def to_markdown(report: Report) -> str:
    lines = [
        "# Build report",
        "",
        "Measured on the validation split with ONNX Runtime (CPU) on the build machine, the `engine-*` "
        "stages with TensorRT on its GPU. Speed-ups "
        "(throughput at batch 8) and sizes (file bytes, new / old) are given against the previous stage "
        "and against fp32, the trained model; Δtop-1 is against the previous stage. A stage a later "
        "one replaced is not the previous stage of the next.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows()]
    lines += notes_lines(report)
    lines += ["", f"Accuracy budget: at most {report.max_accuracy_drop:g} points below the first stage."]
    if report.failure:
        where = f"at stage `{report.failed_stage}`" if report.failed_stage else "(build stopped)"
        lines += ["", f"**FAILED {where}**: {report.failure}"]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    throughputs = [m.throughput_b8 for m in report.stages]
    middle = (min(throughputs) + max(throughputs)) / 2 if throughputs else 0.0
    for metrics, row in zip(report.stages, report.rows()):
        color = "tab:red" if metrics.stage == report.failed_stage else "tab:blue"
        axes.scatter(metrics.throughput_b8, 100 * metrics.top1, color=color)
        label = metrics.stage
        if "change" in row:  # both bases, named: a bare "3x" was read as against fp32
            label += (
                f"\n{_change(row, 'throughput_speedup', '{:.2f}x')} vs previous, "
                f"{_change(row, 'throughput_speedup', '{:.2f}x', 'vs_fp32')} vs fp32"
            )
        right = metrics.throughput_b8 > middle  # labels of the fastest stages go to their left, inside
        axes.annotate(
            label,
            (metrics.throughput_b8, 100 * metrics.top1),
            textcoords="offset points",
            xytext=(-5 if right else 5, 5),
            ha="right" if right else "left",
            fontsize=8,
        )
    axes.set_xlabel("throughput at batch 8 (images/s; ONNX Runtime, engines TensorRT)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("accuracy against throughput, one point per stage")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def write_report(report: Report, folder: Path, *, console: Console | None = None) -> dict[str, Path]:
    """The table on the terminal, and report.md, report.json, report.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=200)  # logs and CI: do not squeeze the table to 80 columns
    console.print(rich_table(report))
    for line in notes_lines(report)[1:]:
        console.print(line, markup=False, highlight=False)
    paths = {"md": folder / "report.md", "json": folder / "report.json", "png": folder / "report.png"}
    paths["md"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2))
    plot(report, paths["png"])
    return paths
