"""`builder build`: train, export, prune, quantize and publish in one go, with a report of each stage.

The pipeline calls the same functions the subcommands call. Every stage's ONNX file is measured the
same way (`report.measure_stage`), and a stage that loses more top-1 than `max_accuracy_drop` points
against the trained model stops the build before anything is published; the report names the stage.

Quantization (`quantize:` section, `qat: auto|always|never`): with `auto` (the default), a static INT8
stage over the budget does not stop the build at once: quantization-aware training runs from the
latest checkpoint (pruned, else trained) and is measured as stage `int8-qat`; the build fails only if
that stage is over the budget too. The report keeps both rows, the static one with a note. `always`
runs QAT instead of static INT8; `never` keeps static INT8 only.

The quantize section's `target` (default: the publish section's target, else cpu) picks which INT8:
cpu is ONNX Runtime's (stage `int8`); gpu is NVIDIA Model Optimizer's zero-point-0 INT8 for TensorRT
(stage `int8-gpu`, file `int8-gpu.onnx`, the build's final ONNX for the engine), measured with ONNX
Runtime on the CPU and gated like every stage. QAT writes ONNX Runtime's uint8 form, which TensorRT's
parser refuses, so a gpu target has no QAT fallback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .checkpoint import load_model
from .data import load_run_dataset
from .errors import BudgetError, BuilderError, error_line
from .evaluate import validation_data
from .export import export_model, parity_batch
from .models import count_macs_and_params
from .prune import PruneConfig, prune
from .publish import PublishedVersion, PublishSettings, publish
from .qat import QATConfig, quantization_aware_train
from .quantize import QuantizeConfig, quantize_int8
from .report import Report, StageMetrics, measure_stage, write_report

log = logging.getLogger(__name__)

SECTIONS = ("train", "prune", "quantize", "publish")
QAT_MODES = ("auto", "always", "never")


@dataclass
class BuildConfig:
    name: str = "model"
    out_dir: Path = Path("runs/build")
    checkpoint: Path | None = None  # start from a trained checkpoint instead of training
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    prune: dict[str, Any] | None = field(default_factory=dict)  # PruneConfig fields; None skips the stage
    # QuantizeConfig fields, plus `qat`: auto (quantization-aware training when static INT8 is over the
    # accuracy budget), always (QAT instead of static INT8) or never; and `qat_<QATConfig field>`
    # (qat_epochs, qat_lr, ...). None skips the stage.
    quantize: dict[str, Any] | None = field(default_factory=dict)
    publish: dict[str, Any] | None = None  # PublishSettings fields + "repository"; None skips it
    max_accuracy_drop: float = 1.0  # top-1 points below the trained model
    parity_images: int = 32
    benchmark_seconds: float = 1.5  # per batch size and stage; the median run is reported

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "BuildConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BuilderError(f"unknown build settings {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
        values = dict(data)
        for key in ("out_dir", "checkpoint"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        for section in SECTIONS:
            # `prune: false` in YAML skips a stage; `prune:` (empty) runs it with defaults.
            if values.get(section) is False:
                values[section] = None
            elif section in values and values[section] is None:
                values[section] = {}
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path) -> "BuildConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise BuilderError(f"build file {path} cannot be read: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise BuilderError(f"build file {path} is not valid YAML: {error_line(e)}") from e
        if not isinstance(data, dict):
            raise BuilderError(f"build file {path} must be a mapping of settings")
        return cls.from_mapping(data)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return data


@dataclass(frozen=True)
class BuildResult:
    report: Report
    report_paths: dict[str, Path]
    final_onnx: Path
    published: PublishedVersion | None


def _section(config_type, values: Mapping[str, Any], stage: str):
    try:
        return config_type(**values)
    except TypeError as e:
        valid = ", ".join(f.name for f in dataclasses.fields(config_type))
        raise BuilderError(f"bad {stage} settings ({e}); valid: {valid}") from e


def _quantize_sections(values: Mapping[str, Any] | None, publish_target: str = "cpu",
                       ) -> tuple[QuantizeConfig | None, str, QATConfig | None]:
    """The static INT8 settings, the QAT mode and the QAT settings (`qat_<QATConfig field>`) of `quantize`."""
    if values is None:
        return None, "never", None
    values = {"target": publish_target, **values}
    mode = values.pop("qat", "auto")
    if isinstance(mode, bool):  # YAML reads `qat: yes` / `qat: no` as booleans
        mode = "always" if mode else "never"
    if mode not in QAT_MODES:
        raise BuilderError(f"quantize: qat {mode!r} is not one of {', '.join(QAT_MODES)}")
    if values["target"] == "gpu":
        if mode == "always":
            raise BuilderError("quantize: qat writes ONNX Runtime's uint8 Q/DQ, which TensorRT's ONNX parser "
                               "refuses; for target gpu use qat: never (NVIDIA Model Optimizer's INT8)")
        mode = "never"
    qat_values = {key[len("qat_"):]: values.pop(key) for key in list(values) if key.startswith("qat_")}
    known = {f.name for f in dataclasses.fields(QATConfig)}
    if set(qat_values) - known:
        raise BuilderError(f"unknown quantize settings {', '.join(sorted('qat_' + k for k in set(qat_values) - known))}"
                           f"; valid QAT settings: qat, {', '.join('qat_' + f for f in sorted(known))}")
    qat_config = _section(QATConfig, qat_values, "quantize qat_*") if mode != "never" else None
    return _section(QuantizeConfig, values, "quantize"), mode, qat_config


def _train(config: BuildConfig) -> Path:
    from .train import train
    from .train_config import TrainConfig

    settings = {**config.train, "out_dir": config.out_dir / "train"}
    return train(_section(TrainConfig, settings, "train")).best_checkpoint


def build(config: BuildConfig) -> BuildResult:
    """Run every configured stage; write report.md/json/png into `out_dir` even when a stage fails."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    prune_config = _section(PruneConfig, config.prune, "prune") if config.prune is not None else None
    publish_values = dict(config.publish or {})
    quantize_config, qat_mode, qat_config = _quantize_sections(config.quantize, publish_values.get("target", "cpu"))
    repository = Path(publish_values.pop("repository", "model_repository"))
    settings = _section(PublishSettings, publish_values, "publish") if config.publish is not None else None
    if settings is not None and settings.target == "cpu" and quantize_config and quantize_config.target == "gpu":
        raise BuilderError("quantize: target gpu writes INT8 for TensorRT, but publish targets the CPU; "
                           "publish with target gpu, or quantize with target cpu")

    checkpoint = config.checkpoint or _train(config)
    model, meta = load_model(checkpoint)
    dataset = load_run_dataset(meta.dataset_recipe)
    data = validation_data(meta, dataset)
    input_shape = meta.input_shape
    parity = parity_batch(meta, config.parity_images, dataset)
    report = Report(max_accuracy_drop=config.max_accuracy_drop)

    def stage(name: str, onnx_path: Path, macs: int, params: int, notes: str = "", check: bool = True,
              ) -> StageMetrics:
        metrics = measure_stage(name, onnx_path, data, macs=macs, parameters=params,
                                confusion_png=out / f"confusion-{name}.png", notes=notes,
                                benchmark_seconds=config.benchmark_seconds)
        report.add(metrics)
        log.info("stage %s: top-1 %.4f, %.0f images/s at batch 8", name, metrics.top1, metrics.throughput_b8)
        if check:
            report.check_budget(metrics)
        return metrics

    def qat_stage(source: Path, macs: int, params: int, notes: str = "") -> Path:
        result = quantization_aware_train(source, out / "int8-qat.onnx", qat_config, dataset)
        stage("int8-qat", result.onnx_path, macs, params, notes=(
            f"{notes}QAT {result.epochs:g} epochs from {Path(source).name}; fake-quant top-1 "
            f"{100 * result.val_accuracy:.2f}%, ONNX Runtime agrees on {100 * result.agreement:.1f}%"))
        return result.onnx_path

    try:
        fp32 = export_model(model, meta, out / "fp32.onnx", parity=parity, source=checkpoint).onnx_path
        macs, params = count_macs_and_params(model, input_shape)
        stage("fp32", fp32, macs, params)
        serving_fp32 = latest = fp32
        latest_checkpoint = checkpoint
        if prune_config is not None:
            pruned = prune(checkpoint, out / "pruned.pt", prune_config, dataset)
            pruned_model, pruned_meta = load_model(pruned.checkpoint)
            latest = serving_fp32 = export_model(pruned_model, pruned_meta, out / "pruned.onnx", parity=parity,
                                                 source=pruned.checkpoint).onnx_path
            stage("pruned", latest, pruned.macs_after, pruned.params_after)
            macs, params = pruned.macs_after, pruned.params_after
            latest_checkpoint = pruned.checkpoint
        if quantize_config is not None and qat_mode == "always":
            latest = qat_stage(latest_checkpoint, macs, params)
        elif quantize_config is not None and quantize_config.target == "gpu":
            latest = quantize_int8(latest, out / "int8-gpu.onnx", quantize_config, dataset).onnx_path
            stage("int8-gpu", latest, macs, params, notes="NVIDIA Model Optimizer INT8 for TensorRT, "
                                                          "measured with ONNX Runtime on the CPU")
        elif quantize_config is not None:
            static = quantize_int8(latest, out / "int8.onnx", quantize_config, dataset).onnx_path
            metrics = stage("int8", static, macs, params, check=qat_mode == "never")
            drop = report.accuracy_drop(metrics)
            if drop <= config.max_accuracy_drop:
                latest = static
            else:  # auto: quantization-aware training gets a chance before the build fails
                note = (f"over the budget ({drop:.2f} points lost > {config.max_accuracy_drop:g}); "
                        f"replaced by int8-qat")
                report.stages[-1] = dataclasses.replace(metrics, notes=note, superseded=True)
                log.warning("static INT8 lost %.2f points of top-1; trying quantization-aware training", drop)
                latest = qat_stage(latest_checkpoint, macs, params,
                                   notes=f"static int8 lost {drop:.2f} points; ")
    except BuilderError as e:  # the stages measured so far are still worth a report
        if not isinstance(e, BudgetError):
            report.failure = f"build stopped: {e}"
        write_report(report, out)
        raise
    paths = write_report(report, out)
    published = None
    if settings is not None:
        # GPU targets get FP32 ONNX: TensorRT in Triton builds its own FP16 engine from it. The GPU INT8
        # (`latest`, int8-gpu.onnx) is for an engine built with explicit quantization (`builder engine`).
        served = serving_fp32 if settings.target == "gpu" else latest
        published = publish(served, repository, config.name, settings=settings)
        (out / "published.json").write_text(json.dumps(
            {"model": config.name, "version": published.version, "path": str(published.version_dir)}))
    return BuildResult(report, paths, latest, published)
