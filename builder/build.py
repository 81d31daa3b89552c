"""`builder build`: train, export, prune, quantize and publish in one go, with a report of each stage.

The pipeline calls the same functions the subcommands call. Every stage's ONNX file is measured the
same way (`report.measure_stage`), and a stage that loses more top-1 than `max_accuracy_drop` points
against the trained model stops the build before anything is published; the report names the stage.

Quantization (`quantize:` section; `qat:` section, mode auto|always|never): with `auto` (the default), a static INT8
stage over the budget does not stop the build at once: quantization-aware training runs from the
latest checkpoint (pruned, else trained) and is measured as stage `int8-qat`; the build fails only if
that stage is over the budget too. The report keeps both rows, the static one with a note. `always`
runs QAT instead of static INT8; `never` keeps static INT8 only.

The quantize section's `target` (default: the publish section's target, else cpu) picks which INT8:
cpu is ONNX Runtime's (stage `int8`); gpu is NVIDIA Model Optimizer's zero-point-0 INT8 for TensorRT
(stage `int8-gpu`, file `int8-gpu.onnx`, the build's final ONNX for the engine), measured with ONNX
Runtime on the CPU and gated like every stage. QAT writes ONNX Runtime's uint8 form, which TensorRT's
parser refuses, so a gpu target has no QAT fallback.

A build for a GPU (quantize or publish target gpu) adds TensorRT engine stages where an NVIDIA GPU and the
TensorRT release of the target Triton are present: `engine-fp16` from the build's final float ONNX and
`engine-int8` from `int8-gpu.onnx` (explicit quantization), each measured through TensorRT. The report says
which engine is published (`report.choose_engine`: the fastest within the accuracy budget; an engine over
the budget is not published, and the build fails only when no engine is within it), and `publish` writes
that plan as the tensorrt_plan model. Elsewhere the report lists both stages as not run, with the reason,
and the build publishes the ONNX model as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from . import rollout
from .checkpoint import load_model
from .data import ImageDataset, load_run_dataset
from .engine import EngineConfig, build_engine
from .errors import BudgetError, BuilderError, QuantizeError, error_line
from .evaluate import ValidationData, compare_decodes, reduced_scale_not_applicable, validation_data
from .export import export_model, parity_batch
from .models import count_macs_and_params
from .onnx_graph import onnx_macs_and_params
from .onnx_meta import (
    DECODE_METADATA,
    OnnxMeta,
    classifier_dims,
    load_onnx,
    model_interface,
    read_labels,
    record_metadata,
    save_with_metadata,
)
from .prune import PruneConfig, prune
from .publish import PublishedVersion, PublishSettings, publish, publish_plan
from .qat import QATConfig, quantization_aware_train
from .quantize import QuantizeConfig, quantize_int8
from .report import (
    ENGINE_STAGES,
    EngineChoice,
    NotRun,
    Report,
    StageMetrics,
    choose_engine,
    measure_engine_stage,
    measure_stage,
    write_report,
)
from .train_config import TrainConfig
from .trt_runtime import tensorrt_unavailable

log = logging.getLogger(__name__)

SECTIONS = ("train", "prune", "quantize", "qat", "publish")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "color_mode")  # `serving_preprocess`'s, publish's flags
QAT_MODES = ("auto", "always", "never")
DEFAULT_REPOSITORY = Path("model_repository")


@dataclass(frozen=True)
class QATSection(QATConfig):
    """The build's `qat:` section: when quantization-aware training runs, and QATConfig's settings for it.

    mode: auto (QAT when static INT8 is over the accuracy budget), always (QAT instead of static INT8) or
    never. In YAML, `qat: always` is short for `qat: {mode: always}`.
    """

    mode: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.mode, bool):  # YAML reads `mode: yes` / `mode: no` as booleans
            object.__setattr__(self, "mode", "always" if self.mode else "never")
        if self.mode not in QAT_MODES:
            raise BuilderError(f"qat: mode {self.mode!r} is not one of {', '.join(QAT_MODES)}")
        super().__post_init__()

    def training(self) -> QATConfig:
        """The settings quantization-aware training takes (the mode is the build's)."""
        return QATConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QATConfig)})


@dataclass(frozen=True)
class BuildOverrides:
    """What `builder build`'s flags change in a build file. None (False for the switches) leaves the file's
    setting; the stage settings apply only to a stage that runs."""

    name: str | None = None
    out_dir: Path | None = None
    checkpoint: Path | None = None
    onnx: Path | None = None
    labels: Path | None = None  # with onnx
    resize: int | None = None  # with onnx: its preprocessing (publish's flags)
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color_mode: str | None = None
    max_accuracy_drop: float | None = None
    dataset: str | None = None  # train; with onnx, the build's own
    arch: str | None = None
    epochs: int | None = None
    image_size: int | None = None
    keep_ratio: float | None = None  # prune
    calibration_images: int | None = None  # quantize
    repository: Path | None = None  # publish: turns it on
    target: str | None = None  # quantize and publish (turns it on)
    no_prune: bool = False
    no_quantize: bool = False
    no_publish: bool = False
    no_reference: bool = False

    def applied_to(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Build settings (sections as mappings, None for a stage switched off) with these overrides."""
        values = dict(values)
        values.update(
            {
                key: getattr(self, key)
                for key in ("name", "out_dir", "checkpoint", "onnx", "labels", "max_accuracy_drop")
                if getattr(self, key) is not None
            }
        )
        preprocess = {key: getattr(self, key) for key in PREPROCESS_KEYS if getattr(self, key) is not None}
        if preprocess:
            current = values.get("preprocess") or {}
            values["preprocess"] = {**current, **preprocess} if isinstance(current, Mapping) else current
        onnx_start = values.get("onnx") is not None
        if onnx_start and self.dataset is not None:
            values["dataset"] = self.dataset

        def merged(section: str, **changes) -> Any:
            current = values.get(section) or {}
            if not isinstance(current, Mapping):  # left for the section's own error
                return current
            return {**current, **{k: v for k, v in changes.items() if v is not None}}

        values["train"] = merged(
            "train",
            dataset=None if onnx_start else self.dataset,
            arch=self.arch,
            epochs=self.epochs,
            image_size=self.image_size,
        )
        if self.no_prune:
            values["prune"] = None
        elif self.keep_ratio is not None and values.get("prune", {}) is not None:
            values["prune"] = merged("prune", keep_ratio=self.keep_ratio)
        if self.no_quantize:
            values["quantize"] = None
        elif values.get("quantize", {}) is not None:  # also without a publish section (--no-publish)
            values["quantize"] = merged("quantize", calibration_images=self.calibration_images, target=self.target)
        if self.repository is not None or self.target is not None:
            values["publish"] = merged("publish", repository=self.repository, target=self.target)
        if self.no_publish:
            values["publish"] = None
        if self.no_reference:
            values["reference"] = False
        return values


@dataclass
class BuildConfig:
    """A build's settings, one typed section per stage; None skips a stage. Mappings given for the sections
    (as a build file has them) are checked and typed when the config is made."""

    name: str = "model"
    out_dir: Path = Path("runs/build")
    checkpoint: Path | None = None  # start from a trained checkpoint instead of training
    # Or from an ONNX classifier (one exported elsewhere, or by `builder export`): no training, pruning or QAT,
    # which need a PyTorch model. Its preprocessing (publish's flags by name: resize, crop, mean, std,
    # color_mode) and labels file where it carries none, and the labelled folder to calibrate and evaluate on.
    onnx: Path | None = None
    dataset: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    labels: Path | None = None
    # The sections' defaults are empty mappings, typed with every default (and the quantize target, when
    # not given, from the publish section's target, else cpu) once the config is made.
    train: TrainConfig = field(default_factory=dict)  # its out_dir is the build's: <out_dir>/train
    prune: PruneConfig | None = field(default_factory=dict)
    quantize: QuantizeConfig | None = field(default_factory=dict)
    qat: QATSection = field(default_factory=dict)
    publish: PublishSettings | None = None
    repository: Path = DEFAULT_REPOSITORY  # where `publish` puts the model; a build file may name it there
    max_accuracy_drop: float = 1.0  # top-1 points below the trained model
    # Where the published model is not the trained FP32 one (pruned, INT8), the FP32 model is published beside
    # it as NAME-reference and named its reference: gateways compare a share of live answers with it.
    reference: bool = True
    parity_images: int = 32
    benchmark_seconds: float = 1.5  # per batch size and stage; the median run is reported

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.checkpoint = Path(self.checkpoint) if self.checkpoint is not None else None
        self.onnx = Path(self.onnx) if self.onnx is not None else None
        self.labels = Path(self.labels) if self.labels is not None else None
        if self.onnx is not None and self.checkpoint is not None:
            raise BuilderError("a build starts from a checkpoint or from an ONNX model: give --checkpoint or --onnx")
        if not isinstance(self.preprocess, Mapping):
            raise BuilderError(f"preprocess: {self.preprocess!r} is not a mapping of settings")
        unknown = sorted(set(self.preprocess) - set(PREPROCESS_KEYS))
        if unknown:
            raise BuilderError(f"unknown preprocess settings {', '.join(unknown)}; valid: {', '.join(PREPROCESS_KEYS)}")
        if self.onnx is None and (self.preprocess or self.labels is not None or self.dataset is not None):
            raise BuilderError("preprocess, labels and dataset are for a build from an ONNX model (--onnx)")
        self.preprocess = dict(self.preprocess)
        if self.publish is not None and not isinstance(self.publish, PublishSettings):
            publish = dict(self.publish) if isinstance(self.publish, Mapping) else self.publish
            if isinstance(publish, dict):
                self.repository = publish.pop("repository", self.repository)
            self.publish = _section(PublishSettings, publish, "publish")
        self.repository = Path(self.repository)
        if self.quantize is not None and not isinstance(self.quantize, QuantizeConfig):
            quantize = dict(self.quantize) if isinstance(self.quantize, Mapping) else self.quantize
            if isinstance(quantize, dict):
                moved = sorted(key for key in quantize if key.startswith("qat_"))
                if moved:
                    raise BuilderError(
                        f"quantize: {', '.join(moved)}: QAT settings are a section of their own "
                        f"now, qat: {{mode: auto, {moved[0][len('qat_') :]}: ...}}"
                    )
                if "qat" in quantize:  # the mode, where earlier build files give it
                    self.qat = _qat_section({**_qat_values(self.qat), "mode": quantize.pop("qat")})
                quantize.setdefault("target", self.publish.target if self.publish is not None else "cpu")
            self.quantize = _section(QuantizeConfig, quantize, "quantize")
        if not isinstance(self.qat, QATSection):
            self.qat = _qat_section(self.qat)
        if not isinstance(self.train, TrainConfig):
            self.train = _section(TrainConfig, self.train, "train")
        if self.prune is not None and not isinstance(self.prune, PruneConfig):
            self.prune = _section(PruneConfig, self.prune, "prune")
        if self.quantize is not None and self.quantize.target == "gpu":
            if self.qat.mode == "always":
                raise BuilderError(
                    "quantize: qat writes ONNX Runtime's uint8 Q/DQ, which TensorRT's ONNX parser "
                    "refuses; for target gpu use qat: never (NVIDIA Model Optimizer's INT8)"
                )
            if self.publish is not None and self.publish.target == "cpu":
                raise BuilderError(
                    "quantize: target gpu writes INT8 for TensorRT, but publish targets the CPU; "
                    "publish with target gpu, or quantize with target cpu"
                )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], overrides: BuildOverrides | None = None) -> BuildConfig:
        """From a build file's settings, then the command line's overrides."""
        known = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(key for key in data if key.startswith("qat_"))
        if moved:
            raise BuilderError(
                f"{', '.join(moved)}: QAT settings are the qat: section, "
                f"qat: {{mode: auto, {moved[0][len('qat_') :]}: ...}}"
            )
        unknown = set(data) - known
        if unknown:
            raise BuilderError(
                f"unknown build settings {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}"
            )
        values = dict(data)
        for section in SECTIONS:
            # `prune: false` in YAML skips a stage; `prune:` (empty) runs it with defaults.
            if values.get(section) is False and section != "qat":
                values[section] = None
            elif section in values and values[section] is None:
                values[section] = {}
        if overrides is not None:
            values = overrides.applied_to(values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path, overrides: BuildOverrides | None = None) -> BuildConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise BuilderError(f"build file {path} cannot be read: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise BuilderError(f"build file {path} is not valid YAML: {error_line(e)}") from e
        if not isinstance(data, dict):
            raise BuilderError(f"build file {path} must be a mapping of settings")
        return cls.from_mapping(data, overrides)

    def to_dict(self) -> dict:
        """The settings as a build file has them (every value spelled out); `from_mapping` reads them back."""

        def plain(value):
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        # A stage switched off is `false`, as in a build file (an empty section runs it with defaults).
        data = {
            f.name: False if getattr(self, f.name) is None and f.name in SECTIONS else plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }
        del data["train"]["out_dir"]  # the build's own
        if self.onnx is not None:  # nothing is trained
            del data["train"]
        return data


def _qat_values(qat: Any) -> dict[str, Any]:
    if isinstance(qat, QATSection):
        return {f.name: getattr(qat, f.name) for f in dataclasses.fields(qat)}
    if isinstance(qat, (str, bool)):  # `qat: always`, `qat: no`
        return {"mode": qat}
    if qat is None:
        return {}
    if not isinstance(qat, Mapping):
        raise BuilderError(f"qat: {qat!r} is neither a mode ({', '.join(QAT_MODES)}) nor a mapping of settings")
    return dict(qat)


def _qat_section(qat: Any) -> QATSection:
    return _section(QATSection, _qat_values(qat), "qat")


@dataclass(frozen=True)
class BuildResult:
    report: Report
    report_paths: dict[str, Path]
    final_onnx: Path
    published: PublishedVersion | None
    published_engine: str | None = None  # the engine stage whose plan was published, if one was
    published_from: Path | None = None  # the ONNX file or plan that was published


def _section(config_type, values: Mapping[str, Any], stage: str):
    if not isinstance(values, Mapping):
        raise BuilderError(f"{stage}: {values!r} is not a mapping of settings")
    fields = [f.name for f in dataclasses.fields(config_type) if f.init]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BuilderError(f"unknown {stage} settings {', '.join(unknown)}; valid: {', '.join(fields)}")
    values = {name: _checked_value(config_type, stage, name, value) for name, value in values.items()}
    try:
        return config_type(**values)
    except TypeError as e:  # a value of a kind the settings cannot take
        raise BuilderError(f"bad {stage} settings ({e}); valid: {', '.join(fields)}") from e


def _checked_value(config_type, stage: str, name: str, value: Any) -> Any:
    """`value` as the field's annotation takes it (YAML's "3" for an int is 3), or one line naming the setting:
    `train: epochs='many': Input should be a valid integer`, not a comparison error from deep inside."""
    try:
        adapter = TypeAdapter(typing.get_type_hints(config_type)[name])
    except Exception:  # an annotation that cannot be resolved or checked: the dataclass's own checks apply
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise BuilderError(f"{stage}: {name}={value!r}: {e.errors()[0]['msg']}") from None


def _train(config: BuildConfig) -> Path:
    from .train import train

    return train(dataclasses.replace(config.train, out_dir=config.out_dir / "train")).best_checkpoint


@dataclass(frozen=True)
class _OnnxStart:
    """A build's starting ONNX model with what the stages need of it, checked before anything is written."""

    meta: OnnxMeta
    dataset: ImageDataset
    data: ValidationData


def _onnx_start(config: BuildConfig) -> _OnnxStart:
    assert config.onnx is not None
    labels = read_labels(config.labels) if config.labels is not None else None
    meta = model_interface(config.onnx, preprocess=config.preprocess, labels=labels, dataset=config.dataset)
    if not meta.has_dataset:
        raise BuilderError(f"{config.onnx} names no dataset: give --dataset (a folder of class sub-folders)")
    dataset = load_run_dataset(meta.dataset_recipe)
    num_classes = classifier_dims(load_onnx(config.onnx))[1]
    if num_classes != len(dataset.classes):
        raise BuilderError(
            f"{config.onnx} has {num_classes} outputs but dataset {dataset.name!r} has {len(dataset.classes)} "
            "classes: give the labelled images of the classes it was trained on (one sub-folder per class)"
        )
    meta = meta.with_dataset_labels(dataset.classes, num_classes)
    wanted = config.quantize.calibration_images if config.quantize is not None else 0
    if wanted > len(dataset.train):
        raise QuantizeError(
            f"asked for {wanted} calibration images but the training split of {dataset.name!r} has only "
            f"{len(dataset.train)}; lower --calibration-images"
        )
    return _OnnxStart(meta, dataset, validation_data(meta, dataset))


def for_gpu_publish(settings: PublishSettings | None) -> bool:
    return settings is not None and settings.target == "gpu"


def measure_gateway_decode(onnx_path: Path, data: ValidationData, max_accuracy_drop: float) -> dict:
    """Top-1 of the model to publish with the gateway's exact and reduced-scale JPEG decoding, recorded in
    its ONNX metadata for publish; or, where the validation images are not JPEG files, why not."""
    reason = reduced_scale_not_applicable(data)
    if reason is not None:
        log.info("%s", reason)
        return {"applies": False, "reason": reason}
    comparison = compare_decodes(onnx_path, data, max_accuracy_drop=max_accuracy_drop)
    record_metadata(onnx_path, {DECODE_METADATA: json.dumps(comparison.to_dict())})
    log.info("%s", comparison.summary())
    return {"applies": True, "model": Path(onnx_path).name, **comparison.to_dict()}


REFERENCE_SUFFIX = "-reference"


def publish_reference(fp32: Path, repository: Path, name: str, settings: PublishSettings) -> str:
    """The trained FP32 model, published as NAME-reference and recorded as `name`'s reference model: a share of
    the requests each gateway answers with `name` is also sent to it, and top-1 agreement with it is counted
    (server/shadow.py), which needs no labels. Its newest version only, whatever its accuracy against the last
    one (it follows the build), taking the same input as `name` so that the gateway's tensor fits both."""
    reference = f"{name}{REFERENCE_SUFFIX}"
    publish(
        fp32,
        repository,
        reference,
        settings=dataclasses.replace(settings, canary_percent=None, keep=1, force=True, preprocess="cpu"),
    )
    rollout.set_reference(repository, name, reference)
    log.info("published the FP32 model as %s, the reference of %s", reference, name)
    return reference


def build(config: BuildConfig) -> BuildResult:
    """Run every configured stage; write report.md/json/png into `out_dir` even when a stage fails."""
    out = Path(config.out_dir)
    # A model exported elsewhere is checked with its data first: a mistake there leaves nothing behind.
    onnx_start = _onnx_start(config) if config.onnx is not None else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    prune_config, quantize_config, settings, repository = (
        config.prune,
        config.quantize,
        config.publish,
        config.repository,
    )
    if settings is not None:
        # One budget for the whole build: its stages against the trained model, and what it publishes
        # against the version served now.
        settings = dataclasses.replace(settings, max_accuracy_drop=config.max_accuracy_drop)
    # TensorRT's parser refuses QAT's uint8 Q/DQ: a gpu target has no QAT fallback.
    qat_mode = "never" if quantize_config is None or quantize_config.target == "gpu" else config.qat.mode
    report = Report(max_accuracy_drop=config.max_accuracy_drop)
    if onnx_start is not None:  # pruning and QAT change a PyTorch model, which an ONNX start does not have
        reason = "needs a PyTorch checkpoint; the build starts from an ONNX model"
        if prune_config is not None:
            report.not_run.append(NotRun("pruned", reason))
        if qat_mode == "always":
            report.not_run.append(NotRun("int8-qat", reason))
        prune_config, qat_mode = None, "never"
    gpu_int8 = quantize_config is not None and quantize_config.target == "gpu"
    for_gpu = gpu_int8 or (settings is not None and settings.target == "gpu")
    qat_config = config.qat.training() if qat_mode != "never" else None

    if onnx_start is None:
        checkpoint: Path | None = config.checkpoint or _train(config)
        model, meta = load_model(checkpoint)
        dataset = load_run_dataset(meta.dataset_recipe)
        data = validation_data(meta, dataset)
        parity = parity_batch(meta, config.parity_images, dataset)
    else:
        checkpoint, dataset, data = None, onnx_start.dataset, onnx_start.data

    def stage(
        name: str,
        onnx_path: Path,
        macs: int,
        params: int,
        notes: str = "",
        check: bool = True,
    ) -> StageMetrics:
        metrics = measure_stage(
            name,
            onnx_path,
            data,
            macs=macs,
            parameters=params,
            confusion_png=out / f"confusion-{name}.png",
            notes=notes,
            benchmark_seconds=config.benchmark_seconds,
        )
        report.add(metrics)
        # What publish's accuracy check and `builder degrade` read: this file's own top-1 on the build's
        # validation split (an INT8 file carries none of its own, a model exported elsewhere none at all).
        record_metadata(onnx_path, {"val_accuracy": f"{metrics.top1:.6f}"})
        log.info("stage %s: top-1 %.4f, %.0f images/s at batch 8", name, metrics.top1, metrics.throughput_b8)
        if check:
            report.check_budget(metrics)
        return metrics

    def qat_stage(source: Path, macs: int, params: int, notes: str = "") -> Path:
        result = quantization_aware_train(source, out / "int8-qat.onnx", qat_config, dataset)
        stage(
            "int8-qat",
            result.onnx_path,
            macs,
            params,
            notes=(
                f"{notes}QAT {result.epochs:g} epochs from {Path(source).name}; fake-quant top-1 "
                f"{100 * result.val_accuracy:.2f}%, ONNX Runtime agrees on {100 * result.agreement:.1f}%"
            ),
        )
        return result.onnx_path

    def engine_stages(float_onnx: Path, int8_onnx: Path | None, macs: int, params: int) -> dict[str, tuple[Path, Path]]:
        """engine-fp16 and engine-int8 (plan, and the ONNX it was built from) where TensorRT can run, measured
        and chosen between; each stage that cannot run is listed with the reason."""
        unavailable = tensorrt_unavailable()
        built: dict[str, tuple[Path, Path]] = {}
        for name, source in zip(ENGINE_STAGES, (float_onnx, int8_onnx)):
            if unavailable or source is None:
                reason = unavailable or "no int8-gpu.onnx to build it from: the build has no quantize stage"
                report.not_run.append(NotRun(name, reason))
                continue
            plan = build_engine(source, out / f"{name}.plan", EngineConfig(precision=name.removeprefix("engine-")))
            metrics = measure_engine_stage(
                name,
                plan,
                data,
                macs=macs,
                parameters=params,
                confusion_png=out / f"confusion-{name}.png",
                notes=f"built from {source.name}",
                benchmark_seconds=config.benchmark_seconds,
            )
            report.add(metrics)
            log.info("stage %s: top-1 %.4f, %.0f images/s at batch 8", name, metrics.top1, metrics.throughput_b8)
            built[name] = (plan, source)
        if not built:
            fallback = (
                "; publish writes the float ONNX model, whose TensorRT engine Triton's ONNX Runtime builds"
                if settings is not None and settings.target == "gpu"
                else ""
            )
            report.engine_choice = EngineChoice(None, f"no engine stage ran here (see the stages not run){fallback}")
            return built
        measured = [m for m in report.stages if m.stage in built]
        report.engine_choice = choose_engine(measured, report.stages[0], config.max_accuracy_drop)
        for metrics in measured:  # over the budget: kept in the report, never published
            drop = report.accuracy_drop(metrics)
            if drop > config.max_accuracy_drop:
                note = f"over the budget ({drop:.2f} points lost > {config.max_accuracy_drop:g}); not published"
                report.stages[report.stages.index(metrics)] = dataclasses.replace(
                    metrics, notes=f"{metrics.notes}; {note}"
                )
        if report.engine_choice.stage is None:  # the gate: no engine within the budget stops the build
            report.check_budget(min(measured, key=report.accuracy_drop))
        return built

    engines: dict[str, tuple[Path, Path]] = {}
    try:
        if checkpoint is not None:
            fp32 = export_model(model, meta, out / "fp32.onnx", parity=parity, source=checkpoint).onnx_path
            macs, params = count_macs_and_params(model, meta.input_shape)
            notes = ""
        else:  # the model as given, with the preprocessing, labels and dataset it goes on with
            assert config.onnx is not None and onnx_start is not None
            fp32 = save_with_metadata(config.onnx, out / "fp32.onnx", onnx_start.meta)
            macs, params = onnx_macs_and_params(load_onnx(fp32))
            notes = f"from {config.onnx}"
        stage("fp32", fp32, macs, params, notes=notes)
        serving_fp32 = latest = fp32
        latest_checkpoint = checkpoint
        if prune_config is not None and checkpoint is not None:
            pruned = prune(checkpoint, out / "pruned.pt", prune_config, dataset)
            pruned_model, pruned_meta = load_model(pruned.checkpoint)
            latest = serving_fp32 = export_model(
                pruned_model, pruned_meta, out / "pruned.onnx", parity=parity, source=pruned.checkpoint
            ).onnx_path
            stage("pruned", latest, pruned.macs_after, pruned.params_after)
            macs, params = pruned.macs_after, pruned.params_after
            latest_checkpoint = pruned.checkpoint
        if quantize_config is not None and qat_mode == "always":
            latest = qat_stage(latest_checkpoint, macs, params)
        elif quantize_config is not None and quantize_config.target == "gpu":
            latest = quantize_int8(latest, out / "int8-gpu.onnx", quantize_config, dataset).onnx_path
            stage(
                "int8-gpu",
                latest,
                macs,
                params,
                notes="NVIDIA Model Optimizer INT8 for TensorRT, measured with ONNX Runtime on the CPU",
            )
        elif quantize_config is not None:
            static = quantize_int8(latest, out / "int8.onnx", quantize_config, dataset).onnx_path
            metrics = stage("int8", static, macs, params, check=qat_mode == "never")
            drop = report.accuracy_drop(metrics)
            if drop <= config.max_accuracy_drop:
                latest = static
            else:  # auto: quantization-aware training gets a chance before the build fails
                note = f"over the budget ({drop:.2f} points lost > {config.max_accuracy_drop:g}); replaced by int8-qat"
                report.stages[-1] = dataclasses.replace(metrics, notes=note, superseded=True)
                log.warning("static INT8 lost %.2f points of top-1; trying quantization-aware training", drop)
                latest = qat_stage(latest_checkpoint, macs, params, notes=f"static int8 lost {drop:.2f} points; ")
        if for_gpu:
            engines = engine_stages(serving_fp32, latest if gpu_int8 else None, macs, params)
    except BuilderError as e:  # the stages measured so far are still worth a report
        if not isinstance(e, BudgetError):
            report.failure = f"build stopped: {e}"
        write_report(report, out)
        raise
    choice = report.engine_choice
    chosen = engines.get(choice.stage) if choice is not None and choice.stage is not None else None
    if chosen is not None and settings is not None and settings.pixel_input:
        report.engine_choice = dataclasses.replace(
            choice,
            reason=f"{choice.reason}; publish asks for --pixel-input, which a plan cannot take: the ONNX model"
            " is published instead",
        )
        chosen = None
    # What publish reads its metadata from: the ONNX model, or the one the chosen engine was built from.
    served_onnx = chosen[1] if chosen is not None else serving_fp32 if for_gpu_publish(settings) else latest
    report.gateway_decode = measure_gateway_decode(served_onnx, data, config.max_accuracy_drop)
    paths = write_report(report, out)
    published, published_engine, published_from = None, None, None
    if settings is not None and chosen is not None:
        published_engine = report.engine_choice.stage if report.engine_choice else None
        published = publish_plan(chosen[0], chosen[1], repository, config.name, settings=settings)
        published_from = chosen[0]
    elif settings is not None:
        # Without an engine, GPU targets get FP32 ONNX: TensorRT in Triton builds its own FP16 engine from it.
        published_from = serving_fp32 if for_gpu_publish(settings) else latest
        published = publish(published_from, repository, config.name, settings=settings)
    reference = None
    if published is not None and config.reference and published_from != fp32:
        reference = publish_reference(fp32, repository, config.name, settings)
    if published is not None:
        (out / "published.json").write_text(
            json.dumps(
                {
                    "model": config.name,
                    "version": published.version,
                    "path": str(published.version_dir),
                    "engine": published_engine,
                    "reference": reference,
                }
            )
        )
    return BuildResult(report, paths, latest, published, published_engine, published_from)
