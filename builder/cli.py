"""`builder` command line: parses flags, calls the stage functions, prints results.

User mistakes (a BuilderError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import BuilderError
from .train_config import (
    AMP_MODES,
    ARCHITECTURES,
    AUGMENT_PRESETS,
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    describe_sources,
    load_param_layers,
)

log = logging.getLogger("builder")


def _train_config(args: argparse.Namespace):
    """TrainConfig from its defaults, then `--params` (a tune result), then the flags given explicitly."""
    from .shapes import with_options

    given = {key: value for key, value in vars(args).items() if key in _RECIPE_FIELDS}
    layers = load_param_layers(Path(args.params)) if getattr(args, "params", None) else []
    values = {}
    for _, settings in layers:
        values.update(settings)
    values.update(given)
    if layers:
        print(
            "\n".join(["training settings, by source:", *describe_sources([*layers, ("flags", given)])]),
            file=sys.stderr,
        )
    if "out" in vars(args):
        values["out_dir"] = Path(args.out)
    values["dataset"] = with_options(
        values.get("dataset", "digits"),
        per_class=getattr(args, "shapes_per_class", None),
        imbalance=getattr(args, "shapes_imbalance", None),
        size=getattr(args, "shapes_size", None),
    )
    try:
        return TrainConfig(**values)
    except TypeError as e:  # a params file value of the wrong kind
        raise BuilderError(f"training settings: {e}") from e


def _train(args: argparse.Namespace) -> None:
    from .distributed import environment_rank
    from .train import train

    config = _train_config(args)
    check_writable(config.out_dir, "run folder")
    result = train(config)
    if environment_rank() != 0:  # under torchrun, rank 0 prints the one result line
        return
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "best_checkpoint": str(result.best_checkpoint),
                "val_accuracy": round(result.val_accuracy, 4),
                "epochs": result.epochs,
                "stopped_early": result.stopped_early,
                "seconds": round(result.seconds, 1),
                "warnings": list(result.warnings),
            }
        )
    )


def _tune(args: argparse.Namespace) -> None:
    from .tune import TuneConfig, tune

    base = _train_config(args)
    check_writable(Path(args.out), "study folder")
    config = TuneConfig(
        trials=args.trials,
        timeout_s=args.timeout,
        sampler=args.sampler,
        seed=base.seed,
        out_dir=Path(args.out),
        storage=args.storage,
        study=args.study,
    )
    result = tune(base, config)
    print(
        json.dumps(
            {
                "study": result.study_name,
                "trials": result.trials,
                "completed": result.completed,
                "pruned": result.pruned,
                "best_val_accuracy": round(result.best_value, 4),
                "best_params": result.best_params,
                "best_json": str(result.best_json),
                "plot": str(result.plot),
            }
        )
    )


def _export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    output = Path(args.output) if args.output else Path(args.checkpoint).with_name("model.onnx")
    result = export_onnx(Path(args.checkpoint), output, parity_images=args.parity_images)
    print(
        json.dumps(
            {"onnx": str(result.onnx_path), "max_abs_diff": result.max_abs_diff, "parity_images": result.parity_images}
        )
    )


def _publish(args: argparse.Namespace) -> None:
    from .publish import PublishSettings, publish, publish_plan

    given = _given(args, PUBLISH)
    if args.plan:  # an engine is for a GPU
        given.setdefault("target", "gpu")
    settings = PublishSettings(**given)
    spec, labels = _publish_interface(args)
    if args.plan:
        published = publish_plan(
            Path(args.plan),
            Path(args.onnx),
            Path(args.repository),
            args.name,
            spec=spec,
            labels=labels,
            settings=settings,
        )
    else:
        published = publish(
            Path(args.onnx), Path(args.repository), args.name, spec=spec, labels=labels, settings=settings
        )
    print(json.dumps({"model": args.name, "version": published.version, "path": str(published.version_dir)}))


def _rollout(args: argparse.Namespace) -> None:
    from . import rollout

    repository = Path(args.repository)
    guard = {name: getattr(args, name) for name in GUARD_OPTIONS if getattr(args, name) is not None}
    if args.canary is None and (
        args.version is not None or args.sticky_header is not None or args.shadow_percent is not None or guard
    ):
        raise BuilderError("--version, --sticky-header, --shadow-percent and the guard rails go with --canary")
    if args.reference is None and args.reference_percent is not None:
        raise BuilderError("--reference-percent goes with --reference")
    if args.force and not args.promote:
        raise BuilderError("--force goes with --promote")
    if args.canary is not None:
        started = rollout.start(
            repository, args.name, args.canary, args.version, args.sticky_header, args.shadow_percent, guard
        )
        print(json.dumps({"model": args.name, "rollout": dataclasses.asdict(started)}))
    elif args.reference is not None:
        chosen = rollout.set_reference(repository, args.name, args.reference, args.reference_percent, must_fit=True)
        print(json.dumps({"model": args.name, "reference": dataclasses.asdict(chosen) if chosen else None}))
    elif args.promote or args.abort:
        if args.promote:
            ask = None if args.force else _refusing_a_halted_canary(args)
            kept = rollout.promote(repository, args.name, before_write=ask)
        else:
            kept = rollout.abort(repository, args.name)
        print(json.dumps({"model": args.name, "serving": kept}))
    else:
        (url, *others) = _gateway_urls(args)
        if others:
            raise BuilderError("--status asks one gateway: give one --gateway-url")
        print(json.dumps(rollout.status(repository, args.name, url, _gateway_key(args)), indent=2))


def _gateway_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("GATEWAY_API_KEY") or None


def _gateway_urls(args: argparse.Namespace) -> list[str]:
    """Every --gateway-url, else where a gateway started from this environment listens (GATEWAY_HOST,
    GATEWAY_PORT)."""
    if args.gateway_url:
        return list(args.gateway_url)
    host = os.environ.get("GATEWAY_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # every interface: this machine answers on loopback
        host = "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return [f"http://{host}:{os.environ.get('GATEWAY_PORT') or 8080}"]


def _refusing_a_halted_canary(args: argparse.Namespace) -> Callable[[Any], None]:
    """--promote's check before it writes: a canary the gateway's guard rails halted, or have not yet judged
    on --min-requests of its requests in this rollout, or one no gateway could be asked about, is not
    promoted without --force."""
    from server.rollout import Guard

    from .rollout import GatewayUnanswered, canary_verdict

    def ask(current: Any) -> None:
        if current is None:
            return  # a rollout no gateway can read is followed by none, so none halted its canary
        # Each gateway judges the canary on its own requests: every one named must have judged it, none halted.
        for url in _gateway_urls(args):
            ask_one(url, current)

    def ask_one(url: str, current: Any) -> None:
        try:
            reason, judged = canary_verdict(url, _gateway_key(args), args.name, current)
        except GatewayUnanswered as e:
            raise BuilderError(
                f"{e}: no gateway said whether it halted the canary; give --gateway-url (and --api-key), or "
                "--force to promote without asking"
            ) from e
        if reason is not None:
            raise BuilderError(
                f"the gateway at {url} halted version {current.canary} of {args.name!r} ({reason} guard rail, "
                "see --status): --abort it, or give --force to promote it anyway"
            )
        needed = (current.guard or Guard()).min_requests
        if judged < needed:
            raise BuilderError(
                f"the gateway at {url} has judged {judged} requests of version {current.canary} of {args.name!r} "
                f"in this rollout, fewer than the {needed} its guard rails need (--min-requests): let it serve "
                "more first, or give --force to promote it unjudged"
            )

    return ask


GUARD_OPTIONS = ("max_error_rate", "max_p99_ratio", "min_agreement", "min_requests")


def _number_from_0_to(high: float, what: str) -> Callable[[str], float]:
    """An argparse type: a number from 0 to `high`, else "... is not `what`"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value:g} is not {what}")
        return value

    return parse


_fraction = _number_from_0_to(1, "a fraction from 0 to 1")
_percent = _number_from_0_to(100, "a percentage from 0 to 100")


def _ratio(text: str) -> float:
    value = _non_negative_float(text)
    if 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} is neither 0 (off) nor a ratio of 1 or more")
    return value


def _degrade(args: argparse.Namespace) -> None:
    from . import degrade

    repository = Path(args.repository)
    if args.off and (args.to is not None or args.in_flight is not None or args.to_in_flight is not None):
        raise BuilderError("--off takes no other option")
    if args.off:
        degrade.disable(repository, args.name)
    elif args.to is not None:
        if args.in_flight is None:
            raise BuilderError("--to needs --in-flight N: this model's requests in flight before the next degrades")
        degrade.enable(repository, args.name, args.to, args.in_flight, args.to_in_flight)
    elif args.in_flight is not None or args.to_in_flight is not None:
        raise BuilderError("--in-flight and --to-in-flight go with --to")
    print(json.dumps(degrade.state(repository, args.name)))


def _publish_interface(args: argparse.Namespace):
    """Preprocessing and labels for a model exported elsewhere: flags win over the ONNX metadata."""
    from .publish import inspect_onnx

    embedded = inspect_onnx(Path(args.onnx)).metadata.get("preprocess")
    return _interface_spec(args, embedded), _interface_labels(args)


def _interface_spec(args: argparse.Namespace, carried: str | None):
    """The preprocessing flags (`_add_interface_arguments`) over the spec an ONNX file carries (its JSON);
    None where no flag is given and the file carries one."""
    from .train_config import serving_preprocess

    return serving_preprocess(json.loads(carried) if carried else None, **_interface_flags(args))


def _interface_labels(args: argparse.Namespace) -> list[str] | None:
    from .onnx_meta import read_labels

    return read_labels(Path(args.labels)) if args.labels else None


def _onnx_interface(args: argparse.Namespace, dataset: str | None):
    """The OnnxMeta of `--onnx` with the interface flags and `dataset` put in, checked against the graph."""
    from .onnx_meta import model_interface

    return model_interface(
        Path(args.onnx), preprocess=_interface_flags(args), labels=_interface_labels(args), dataset=dataset
    )


def _interface_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in _INTERFACE_FLAGS}


def _interface_given(args: argparse.Namespace) -> bool:
    return bool(args.labels) or any(value is not None for value in _interface_flags(args).values())


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, measure_speed, validation_data, write_evaluation

    out = Path(args.out)
    if args.checkpoint:
        from .checkpoint import load_model

        if args.gateway_decode:
            raise BuilderError("--gateway-decode scores an ONNX model with ONNX Runtime: give --onnx")
        if _interface_given(args):
            raise BuilderError("the preprocessing and labels flags are for a model exported elsewhere (--onnx)")
        model, meta = load_model(Path(args.checkpoint))
        target = model
        if args.dataset:
            meta = meta.with_dataset(args.dataset)
    else:
        meta = _onnx_interface(args, args.dataset)
        if not meta.has_dataset:
            raise BuilderError(f"{args.onnx} names no dataset: give --dataset (a folder of class sub-folders)")
        target = Path(args.onnx)
    data = validation_data(meta)
    evaluation = evaluate(target, data, confusion_png=out / "confusion.png")
    write_evaluation(evaluation, out / "evaluation.json")
    summary: dict[str, Any] = {
        "top1": round(evaluation.top1, 4),
        "macro_recall": round(evaluation.macro_recall, 4),
        "images": evaluation.images,
        "out": str(out),
    }
    if args.gateway_decode:
        summary["gateway_decode"] = _gateway_decode(Path(args.onnx), data, args.max_accuracy_drop)
    if args.onnx:
        speed = measure_speed(Path(args.onnx))
        summary.update(latency_b1_ms=round(speed.latency_b1_ms, 3), throughput_b8=round(speed.throughput_b8, 1))
    print(json.dumps(summary))


def _gateway_decode(onnx_path: Path, data, max_accuracy_drop: float | None) -> dict[str, Any]:
    """Top-1 with the gateway's exact and reduced-scale decoding, recorded in the ONNX file for publish."""
    from .evaluate import DEFAULT_DECODE_BUDGET, compare_decodes, reduced_scale_not_applicable
    from .onnx_meta import DECODE_METADATA, record_metadata

    reason = reduced_scale_not_applicable(data)
    if reason is not None:
        print(reason, file=sys.stderr)
        return {"applies": False, "reason": reason}
    budget = DEFAULT_DECODE_BUDGET if max_accuracy_drop is None else max_accuracy_drop
    comparison = compare_decodes(onnx_path, data, max_accuracy_drop=budget)
    record_metadata(onnx_path, {DECODE_METADATA: json.dumps(comparison.to_dict())})
    print(f"{comparison.summary()}; recorded in {onnx_path}", file=sys.stderr)
    return {"applies": True, **comparison.to_dict(), "recorded_in": str(onnx_path)}


def _prune(args: argparse.Namespace) -> None:
    from .prune import PruneConfig, prune

    config = PruneConfig(**_given(args, PRUNE))
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name("pruned.pt")
    if Path(args.checkpoint).is_file():  # a missing one is the stage's to report, in its words
        check_writable(output.parent, "output folder")
    result = prune(Path(args.checkpoint), output, config)
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "macs_kept": round(result.macs_after / result.macs_before, 4),
                "params_kept": round(result.params_after / result.params_before, 4),
                "val_accuracy": result.history[-1]["val_accuracy"] if result.history else None,
            }
        )
    )


def _quantize(args: argparse.Namespace) -> None:
    from .quantize import QuantizeConfig, convert_fp16, quantize_int8

    if args.method == "qat":
        _quantize_aware(args)
        return
    if args.checkpoint or not args.onnx:
        raise BuilderError(
            "--method static (INT8 or FP16) reads an exported model: give --onnx (--checkpoint is for --method qat)"
        )
    onnx_path = Path(args.onnx)
    if args.precision == "fp16":
        output = Path(args.output) if args.output else onnx_path.with_name(onnx_path.stem + "-fp16.onnx")
        given = _interface_given(args) or args.calibration_data
        meta = _onnx_interface(args, args.calibration_data) if given else None
        print(json.dumps({"onnx": str(convert_fp16(onnx_path, output, meta))}))
        return
    config = QuantizeConfig(**_given(args, QUANTIZE))
    suffix = "-int8-gpu.onnx" if config.target == "gpu" else "-int8.onnx"
    output = Path(args.output) if args.output else onnx_path.with_name(onnx_path.stem + suffix)
    meta = _onnx_interface(args, args.calibration_data)
    result = quantize_int8(onnx_path, output, config, meta=meta)
    print(
        json.dumps(
            {
                "onnx": str(result.onnx_path),
                "calibration_images": result.calibration_images,
                "method": result.method,
                "target": result.target,
            }
        )
    )


def _quantize_aware(args: argparse.Namespace) -> None:
    from .qat import QATConfig, quantization_aware_train

    if args.precision != "int8":
        raise BuilderError(f"--method qat writes INT8; it cannot be combined with --precision {args.precision}")
    if args.onnx or not args.checkpoint:
        raise BuilderError(
            "--method qat fine-tunes a PyTorch model: give --checkpoint (a trained or pruned .pt), not --onnx"
        )
    if args.calibration_data or _interface_given(args):
        raise BuilderError("--method qat takes its data and preprocessing from --checkpoint, not from flags")
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_name(checkpoint.stem + "-int8-qat.onnx")
    if checkpoint.is_file():  # a missing one is the stage's to report, in its words
        check_writable(output.parent, "output folder")
    result = quantization_aware_train(checkpoint, output, QATConfig(**_given(args, QAT)))
    print(
        json.dumps(
            {
                "onnx": str(result.onnx_path),
                "method": "qat",
                "epochs": result.epochs,
                "val_accuracy": round(result.val_accuracy, 4),
                "onnx_agreement": round(result.agreement, 4),
                "seconds": round(result.seconds, 1),
            }
        )
    )


def _engine(args: argparse.Namespace) -> None:
    from .engine import EngineConfig, engine_from_onnx

    config = EngineConfig(**_given(args, ENGINE))
    output = Path(args.output) if args.output else Path(args.onnx).with_name("model.plan")
    print(json.dumps({"plan": str(engine_from_onnx(Path(args.onnx), output, config))}))


def _build(args: argparse.Namespace) -> None:
    from .build import BuildConfig, BuildOverrides, build

    overrides = BuildOverrides(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOverrides)})
    config = (
        BuildConfig.from_yaml(Path(args.config), overrides) if args.config else BuildConfig.from_mapping({}, overrides)
    )
    # Before anything is trained: an unwritable destination would otherwise fail only at the end.
    check_writable(config.out_dir, "build folder")
    if config.publish is not None:
        check_writable(config.repository, "model repository")
    result = build(config)
    print(
        json.dumps(
            {
                "report": str(result.report_paths["md"]),
                "onnx": str(result.final_onnx),
                "published_version": result.published.version if result.published else None,
                "published_from": str(result.published_from) if result.published_from else None,
            }
        )
    )


def check_writable(folder: Path, what: str) -> None:
    """Fail with one line unless `folder` can be written, or made where it does not exist yet."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise BuilderError(f"{what} {folder} is not writable ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise BuilderError(f"{what} {folder} is not writable ({reason})")


def _whole_number(text: str, minimum: int, wording: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {wording}")
    return value


def _storage_url(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty URL names no storage (leave --storage out for study.db in --out)")
    return text


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number, 0 or more")
    return value


def _alphas(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (0 turns it off)")
    return value


@dataclasses.dataclass(frozen=True)
class _Field:
    """The settings dataclass field behind a flag, named rather than imported: most stage modules import
    torch, which only the stages that train or read checkpoints should pay for."""

    module: str
    config: str
    name: str

    def default(self) -> Any:
        config_type = getattr(importlib.import_module(self.module), self.config)
        field = next(f for f in dataclasses.fields(config_type) if f.name == self.name)
        return field.default_factory() if field.default is dataclasses.MISSING else field.default


# The settings dataclass of each command; its flags' values are read back with `_given`.
PRUNE = ("builder.prune", "PruneConfig")
QUANTIZE = ("builder.quantize", "QuantizeConfig")
QAT = ("builder.qat", "QATConfig")
ENGINE = ("builder.engine", "EngineConfig")
PUBLISH = ("builder.publish", "PublishSettings")
TRAIN = ("builder.train_config", "TrainConfig")
BUILD = ("builder.build", "BuildConfig")


def _setting(
    parser: argparse.ArgumentParser,
    flag: str,
    config: tuple[str, str],
    name: str,
    help: str = "",
    dest: str | None = None,
    default: Any = argparse.SUPPRESS,
    **kwargs,
) -> None:
    """A flag that sets field `name` of `config`. Not given, it is left out of the namespace (or None), so
    the dataclass's own default applies; the help shows that default."""
    if "choices" not in kwargs and kwargs.get("action") not in ("store_true", "store_false"):
        kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
    action = parser.add_argument(flag, dest=dest or f"{config[1]}.{name}", default=default, help=help, **kwargs)
    action.field = _Field(*config, name)


def _given(args: argparse.Namespace, config: tuple[str, str]) -> dict[str, Any]:
    """The fields of `config` whose flags were given."""
    prefix = config[1] + "."
    return {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}


# TrainConfig fields that are flags of the same name; the run folder is --out.
_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "out_dir")


# The preprocessing flags of a model exported elsewhere, named as `serving_preprocess` takes them.
_INTERFACE_FLAGS = ("resize", "crop", "mean", "std", "color_mode")


def _add_interface_arguments(parser: argparse.ArgumentParser, labels_default: str) -> None:
    """The preprocessing and labels of a model exported elsewhere (publish, quantize, evaluate, build). Given
    ones win over what the ONNX file carries; a file that carries no spec takes ImageNet's for those not given."""
    group = parser.add_argument_group(
        "a model exported elsewhere", "its preprocessing and labels; given flags win over the ONNX metadata"
    )
    group.add_argument("--labels", help=f"text file, one label per line ({labels_default})")
    group.add_argument("--resize", type=_positive_int, help="shorter side before the crop (default 256)")
    group.add_argument("--crop", type=_positive_int, help="center crop = model input side (default 224)")
    group.add_argument("--mean", type=float, nargs="+", help="per channel (default ImageNet's)")
    group.add_argument("--std", type=float, nargs="+", help="per channel (default ImageNet's)")
    group.add_argument("--color-mode", choices=("RGB", "BGR", "L"), help="default RGB")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The training recipe's flags. None has a parser default (SUPPRESS): a flag not given leaves the
    setting to `--params` or to TrainConfig's default (shown in the help)."""

    def add(flag: str, help: str, **kwargs) -> None:
        name = flag.lstrip("-").replace("-", "_")
        _setting(parser, flag, TRAIN, name, help, dest=name, **kwargs)

    add(
        "--dataset",
        "digits, shapes[:per_class=N,imbalance=R,size=S], cifar10, cifar100 or a folder of class subfolders",
    )
    add(
        "--image-size",
        "model input side in pixels (default: the dataset's: 32 for digits and shapes, 224 for folders)",
        type=_positive_int,
    )
    add("--val-fraction", "validation share of the data", type=float)
    add(
        "--mean",
        "per-channel mean (default: measured on the training split; --pretrained: the weights')",
        type=float,
        nargs="+",
    )
    add(
        "--std",
        "per-channel std (default: measured on the training split; --pretrained: the weights')",
        type=float,
        nargs="+",
    )
    add("--equalize", "histogram-equalize every image (also in the gateway)", action="store_true")
    for flag, kind, text in (
        ("--shapes-per-class", _positive_int, "shapes: training images of the largest class"),
        ("--shapes-imbalance", float, "shapes: largest / smallest class in the training split"),
        ("--shapes-size", _positive_int, "shapes: generated image side"),
    ):
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    add("--arch", "architecture", choices=ARCHITECTURES)
    add("--dropout", "dropout before the classifier (default: 0 for ResNets, 0.2 for MobileNetV3)", type=float)
    add("--init", "start from the weights of this builder checkpoint (mismatched layers are skipped)")
    add("--freeze-backbone", "train the classifier only", action="store_true")
    add(
        "--pretrained",
        "start from torchvision's published ImageNet weights (DEFAULT, or a name such as IMAGENET1K_V1), "
        "with their input size and normalization unless given",
        nargs="?",
        const="DEFAULT",
        metavar="WEIGHTS",
    )
    add(
        "--freeze-epochs",
        "first epochs with the backbone frozen (default: 1 with --pretrained)",
        type=_non_negative_int,
    )
    add("--backbone-lr-scale", "backbone lr / classifier lr (default: 0.1 with --pretrained)", type=float)
    add("--augment", "augmentation preset", choices=AUGMENT_PRESETS)
    add("--cutmix", "CutMix alpha, 0 = off (strong preset: 1.0)", type=_alphas)
    add("--mixup", "MixUp alpha, 0 = off (strong preset: 0.2)", type=_alphas)
    add("--loss", "ce (cross-entropy) or focal", choices=LOSSES)
    add("--class-weights", "none, auto (inverse training frequency) or w1,w2,... one per class")
    add(
        "--class-weights-start",
        "first epoch with the class weights; later defers re-weighting until the features are learned",
        type=_positive_int,
    )
    add("--label-smoothing", "label smoothing", type=float)
    add("--focal-gamma", "focal loss focusing parameter", type=float)
    add("--optimizer", "adamw, or sgd (momentum 0.9, Nesterov)", choices=OPTIMIZERS)
    add("--lr", "peak learning rate", type=float)
    add("--weight-decay", "weight decay", type=float)
    add("--batch-size", "images per micro-batch", type=_positive_int)
    add("--accum-steps", "micro-batches per optimizer step (gradient accumulation)", type=_positive_int)
    add("--epochs", "epochs", type=_positive_int)
    add("--schedule", "cosine (warmup + cosine), step (lr * gamma^(epoch // step-size)) or onecycle", choices=SCHEDULES)
    add("--warmup-epochs", "linear warmup (cosine, step; onecycle's rise)", type=float)
    add("--step-size", "epochs between decays (step schedule)", type=_positive_int)
    add("--gamma", "decay factor (step schedule)", type=float)
    add("--clip-grad", "clip the gradient norm to this", type=float)
    add("--amp", "mixed precision: auto (only on CUDA), on, off", choices=AMP_MODES)
    add("--patience", "stop after this many epochs without a better val accuracy", type=_positive_int)
    add("--seed", "seed: split, initialization, shuffling, augmentation", type=int)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends the default of a flag's dataclass field, read from the dataclass when help is asked for."""

    def add_argument(self, action: argparse.Action) -> None:
        field = getattr(action, "field", None)
        default = field.default() if field is not None and action.nargs != 0 else None
        if default is not None:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: {default})".lstrip()
        super().add_argument(action)


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line, the error and where the options are listed, and exit code 2:
    argparse's usage block would bury the error under dozens of lines for `train`."""

    def __init__(self, *args, **kwargs) -> None:
        # `--epoch 1` must not quietly run as `--epochs 1`: a mistyped flag is a mistake to report.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="builder", description="Train, export and publish image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(command_parsers=commands.choices)

    train = commands.add_parser("train", help="train a classifier")
    _add_recipe_arguments(train)
    train.add_argument(
        "--out", default=argparse.SUPPRESS, help="run folder for checkpoints and metrics (default runs/latest)"
    )
    train.add_argument(
        "--params",
        help="JSON of settings, e.g. best.json from `builder tune`: its recorded base "
        "(dataset, image size, architecture, ...), then its tuned params; flags given win",
    )
    train.add_argument(
        "--resume", action="store_true", default=argparse.SUPPRESS, help="continue the run in --out from its last.pt"
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        default=argparse.SUPPRESS,
        help="write TensorBoard event files to <out>/tensorboard",
    )
    train.set_defaults(func=_train)

    tune = commands.add_parser(
        "tune", help="search learning rate, weight decay, batch size, augmentation and label smoothing with Optuna"
    )
    _add_recipe_arguments(tune)
    tune.add_argument("--out", default="runs/tune", help="study folder: study.db, trial-NNN/, best.json, tune.png")
    tune.add_argument("--trials", type=_positive_int, default=20, help="trials to add to the study")
    tune.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    tune.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    tune.add_argument(
        "--storage",
        type=_storage_url,
        help="a study shared by workers on many machines: an RDB URL (sqlite:///x.db, postgresql://...) or "
        "journal://PATH, a journal file on a shared filesystem (default: study.db in --out)",
    )
    tune.add_argument("--study", help="the study's name in --storage (default: tune-<--out folder name>)")
    tune.set_defaults(func=_tune)

    export = commands.add_parser("export", help="export a checkpoint to ONNX, parity-checked")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--output", help="ONNX path (default: model.onnx beside the checkpoint)")
    export.add_argument("--parity-images", type=_positive_int, default=32)
    export.set_defaults(func=_export)

    publish = commands.add_parser("publish", help="publish an ONNX model as the next version in a Triton repository")
    publish.add_argument("--onnx", required=True)
    publish.add_argument("--name", required=True)
    publish.add_argument("--repository", default="model_repository")
    _setting(publish, "--max-batch-size", PUBLISH, "max_batch_size", type=_positive_int)
    _setting(
        publish,
        "--instances",
        PUBLISH,
        "instance_count",
        type=_positive_int,
        help="model instances Triton runs side by side (default: 2 on the CPU, as Triton itself does for "
        "ONNX Runtime; 1 per GPU)",
    )
    _setting(
        publish,
        "--intra-op-threads",
        PUBLISH,
        "intra_op_threads",
        type=_non_negative_int,
        help="CPU target: ONNX Runtime threads per instance (0: the serving machine's cores divided among "
        "the instances)",
    )
    _setting(
        publish,
        "--max-queue-delay-us",
        PUBLISH,
        "max_queue_delay_us",
        type=_non_negative_int,
        help="how long Triton waits to fill a batch (default: 0 on the CPU, 2000 on a GPU)",
    )
    _setting(
        publish,
        "--max-queue-size",
        PUBLISH,
        "max_queue_size",
        type=_positive_int,
        help="requests queued before Triton rejects (the gateway answers 429)",
    )
    _setting(
        publish,
        "--intra-op-spinning",
        PUBLISH,
        "intra_op_spinning",
        action="store_true",
        help="CPU target: ONNX Runtime's idle threads busy-wait for the next batch (its own default; faster "
        "only where Triton has the cores to itself)",
    )
    _setting(
        publish,
        "--no-dynamic-batching",
        PUBLISH,
        "dynamic_batching",
        action="store_false",
        help="one request per model execution (no batching across requests, no queue bound)",
    )
    _setting(
        publish,
        "--target",
        PUBLISH,
        "target",
        choices=("cpu", "gpu"),
        help="cpu: Python backend + ONNX Runtime; gpu: ONNX Runtime backend with TensorRT (gpu with --plan)",
    )
    _setting(
        publish,
        "--pixel-input",
        PUBLISH,
        "pixel_input",
        action="store_true",
        help="the model takes N x H x W x C uint8 pixels and normalizes them itself: a quarter of the bytes "
        "per request, and no float arithmetic in the gateway",
    )
    _setting(
        publish,
        "--preprocess",
        PUBLISH,
        "preprocess",
        choices=("cpu", "gpu"),
        help="gpu: also NAME-preprocess (Triton's DALI backend: nvJPEG decode, resize, crop, normalize) and "
        "NAME-ensemble, which takes the encoded images: the gateway sends them undecoded",
    )
    publish.add_argument("--plan", help="a TensorRT engine from `builder engine` (with --onnx it was built from)")
    _setting(publish, "--keep", PUBLISH, "keep", type=_positive_int, help="remove all but the newest N versions")
    _setting(publish, "--version-policy", PUBLISH, "version_policy", choices=("latest", "all"))
    _setting(
        publish, "--latest-versions", PUBLISH, "latest_versions", type=_positive_int, help="versions Triton serves"
    )
    _setting(
        publish,
        "--triton-url",
        PUBLISH,
        "triton_url",
        help="Triton HTTP address in explicit model-control mode: load the new version",
    )
    _setting(
        publish,
        "--trt-cache-path",
        PUBLISH,
        "trt_cache_path",
        help="TensorRT engine cache on the serving machine (--target gpu)",
    )
    _setting(
        publish,
        "--no-cuda-graphs",
        PUBLISH,
        "cuda_graphs",
        action="store_false",
        help="TensorRT plans: do not capture CUDA graphs",
    )
    _setting(
        publish,
        "--compute-capability",
        PUBLISH,
        "compute_capability",
        metavar="X.Y",
        help="TensorRT plans: the serving GPUs' compute capability (default: this machine's GPU)",
    )
    _setting(
        publish,
        "--preferred-batch-sizes",
        PUBLISH,
        "preferred_batch_sizes",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="batch sizes Triton waits to form (default: none on the CPU; 4 and 8 on a GPU, "
        "those that fit the max batch)",
    )
    _add_interface_arguments(publish, "default: ONNX metadata, else class index")
    _setting(
        publish,
        "--canary",
        PUBLISH,
        "canary_percent",
        type=_percent,
        metavar="PERCENT",
        help="start a canary rollout: the new version serves PERCENT of requests, the version served until "
        "now the rest (see `builder rollout`)",
    )
    _setting(
        publish,
        "--max-accuracy-drop",
        PUBLISH,
        "max_accuracy_drop",
        type=_non_negative_float,
        help="refuse a model whose recorded top-1 is more points below the serving version's",
    )
    _setting(
        publish,
        "--force",
        PUBLISH,
        "force",
        action="store_true",
        help="publish even over the --max-accuracy-drop budget",
    )
    _setting(
        publish,
        "--no-warmup",
        PUBLISH,
        "warmup",
        action="store_false",
        help="no model_warmup: Triton reports the version READY before any image has run through it",
    )
    publish.set_defaults(func=_publish)

    rollout = commands.add_parser(
        "rollout",
        help="canary rollout of a published version: start, promote, abort, status",
        description="The rollout lives in the model's config.pbtxt; gateways follow it within "
        "GATEWAY_MODEL_INFO_TTL_S of Triton reloading the model.",
    )
    rollout.add_argument("name", help="model name in the repository")
    rollout.add_argument("--repository", default="model_repository")
    action = rollout.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--canary",
        type=_percent,
        metavar="PERCENT",
        help="serve the new version to PERCENT of requests beside the one served now (again: a new percentage)",
    )
    action.add_argument("--promote", action="store_true", help="serve the new version alone")
    action.add_argument("--abort", action="store_true", help="serve the stable version alone")
    action.add_argument(
        "--status",
        action="store_true",
        help="the rollout, and per version requests, errors, p50/p99, agreement, halt (gateway)",
    )
    action.add_argument(
        "--reference",
        metavar="MODEL",
        help="compare every served version's answers with model MODEL's (same preprocessing), as shadow "
        'requests ("": no reference)',
    )
    rollout.add_argument(
        "--version", type=_positive_int, help="version to roll out (default: the newest; during a rollout, its canary)"
    )
    rollout.add_argument(
        "--sticky-header",
        metavar="HEADER",
        help="route by a hash of this request header (e.g. X-Client-ID): one client, one version",
    )
    rollout.add_argument(
        "--shadow-percent",
        type=_percent,
        metavar="PERCENT",
        help="--canary: share of the canary's requests also sent to the stable version to compare answers "
        "(default 100)",
    )
    rails = rollout.add_argument_group(
        "guard rails (with --canary)",
        "a gateway stops routing to a canary that breaks one, over its last requests; 0 turns a rail off",
    )
    rails.add_argument("--max-error-rate", type=_fraction, metavar="FRACTION", help="default 0.05")
    rails.add_argument(
        "--max-p99-ratio", type=_ratio, metavar="RATIO", help="p99 against the stable version's; default 2.0"
    )
    rails.add_argument(
        "--min-agreement", type=_fraction, metavar="FRACTION", help="top-1 agreement with stable; default 0.9"
    )
    rails.add_argument("--min-requests", type=_positive_int, metavar="N", help="judged from N requests; default 50")
    rollout.add_argument(
        "--reference-percent", type=_percent, metavar="PERCENT", help="--reference: share of requests (default 10)"
    )
    rollout.add_argument(
        "--gateway-url",
        action="append",
        help="--status, --promote: the gateway to ask; --promote refuses a canary it halted, or where it cannot "
        "ask (default: http://127.0.0.1:$GATEWAY_PORT, else 8080); again for each gateway --promote asks",
    )
    rollout.add_argument("--api-key", help="--status, --promote: the gateway's API key (default: $GATEWAY_API_KEY)")
    rollout.add_argument(
        "--force", action="store_true", help="--promote: without asking a gateway, even a canary it halted"
    )
    rollout.set_defaults(func=_rollout)

    degrade = commands.add_parser(
        "degrade",
        help="under overload, answer a model's requests by a faster model of its family (or --off)",
        description="Written into the model's config.pbtxt; gateways follow it within GATEWAY_MODEL_INFO_TTL_S "
        "of Triton reloading the model. Without --to or --off: show the setting.",
    )
    degrade.add_argument("name", help="model name in the repository (the slower one)")
    degrade.add_argument("--repository", default="model_repository")
    degrade.add_argument("--to", metavar="FAST", help="the faster model: same preprocessing, labels and input")
    degrade.add_argument(
        "--in-flight",
        type=_positive_int,
        metavar="N",
        help="with N of this model's requests in flight in a gateway worker, the next goes to FAST",
    )
    degrade.add_argument(
        "--to-in-flight",
        type=_positive_int,
        metavar="M",
        help="with M of FAST's requests in flight too, refuse with 429 (default: N)",
    )
    degrade.add_argument("--off", action="store_true", help="the model answers all its requests itself again")
    degrade.set_defaults(func=_degrade)

    evaluate = commands.add_parser("evaluate", help="top-1, per-class precision/recall and confusion matrix")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--onnx")
    evaluate.add_argument(
        "--dataset", help="override the dataset recorded in the model (a folder of class sub-folders, or a built-in)"
    )
    _add_interface_arguments(evaluate, "default: ONNX metadata, else the dataset's class folders")
    evaluate.add_argument("--out", default="runs/evaluate", help="folder for evaluation.json and confusion.png")
    evaluate.add_argument(
        "--gateway-decode",
        action="store_true",
        help="--onnx: also score the JPEG files as the gateway decodes them, exactly and at reduced scale, and "
        "record in the ONNX file whether the gateway may decode at reduced scale for it (publish writes it)",
    )
    evaluate.add_argument(
        "--max-accuracy-drop",
        type=_non_negative_float,
        help="--gateway-decode: top-1 points reduced-scale decoding may cost (default 1, as a build's stages)",
    )
    evaluate.set_defaults(func=_evaluate)

    prune = commands.add_parser("prune", help="structured channel pruning with fine-tuning (Torch-Pruning)")
    prune.add_argument("--checkpoint", required=True)
    prune.add_argument("--output", help="pruned checkpoint (default: pruned.pt beside the input)")
    _setting(prune, "--target", PRUNE, "target", choices=("macs", "params"), help="what --keep-ratio limits")
    _setting(prune, "--keep-ratio", PRUNE, "keep_ratio", type=float, help="fraction of MACs/params to keep")
    _setting(prune, "--importance", PRUNE, "importance", choices=("l1", "l2"), help="channel magnitude norm")
    _setting(
        prune,
        "--scope",
        PRUNE,
        "scope",
        choices=("global", "uniform"),
        help="global: rank channels across layers; uniform: the same fraction in every layer",
    )
    _setting(prune, "--steps", PRUNE, "steps", type=_positive_int, help="prune-then-fine-tune rounds")
    _setting(prune, "--finetune-epochs", PRUNE, "finetune_epochs", type=float, help="per step")
    _setting(prune, "--round-to", PRUNE, "round_to", type=_positive_int, help="channel counts stay multiples of this")
    prune.set_defaults(func=_prune)

    quantize = commands.add_parser(
        "quantize", help="static INT8 (ONNX Runtime, QDQ), FP16, or quantization-aware training (--method qat)"
    )
    quantize.add_argument("--onnx", help="exported model (static INT8 and FP16)")
    quantize.add_argument("--checkpoint", help="trained or pruned checkpoint (--method qat)")
    quantize.add_argument("--output", help="default: beside the input, -int8/-fp16/-int8-qat.onnx")
    quantize.add_argument(
        "--method",
        choices=("static", "qat"),
        default="static",
        help="static: ONNX Runtime calibration of --onnx; qat: fine-tune --checkpoint with fake "
        "quantization (PyTorch), export INT8 QDQ ONNX; for when static INT8 loses too much",
    )
    quantize.add_argument("--precision", choices=("int8", "fp16"), default="int8")
    quantize.add_argument(
        "--calibration-data",
        metavar="FOLDER",
        help="static INT8: labelled images (one sub-folder per class) to calibrate on, from their training split "
        "(default: the dataset the model was exported with)",
    )
    _add_interface_arguments(quantize, "default: ONNX metadata, else the calibration data's class folders")
    _setting(
        quantize,
        "--target",
        QUANTIZE,
        "target",
        choices=("cpu", "gpu"),
        help="static INT8: cpu (ONNX Runtime's u8/s8 Q/DQ) or gpu (NVIDIA Model Optimizer's int8 Q/DQ with "
        "zero point 0, for a TensorRT engine; -int8-gpu.onnx)",
    )
    _setting(quantize, "--calibration-images", QUANTIZE, "calibration_images", type=_positive_int)
    _setting(quantize, "--calibration-method", QUANTIZE, "method", choices=("minmax", "entropy", "percentile"))
    _setting(
        quantize,
        "--full-range-weights",
        QUANTIZE,
        "reduce_range",
        action="store_false",
        help="static INT8: 8-bit weights instead of 7; exact only where the serving CPU has VNNI (or on a "
        "GPU): without it, x86 int8 kernels saturate and accuracy drops",
    )
    _setting(quantize, "--qat-epochs", QAT, "epochs", type=float, help="--method qat: fine-tuning epochs")
    _setting(quantize, "--qat-lr", QAT, "lr", type=float, help="--method qat: peak learning rate (AdamW)")
    quantize.set_defaults(func=_quantize)

    engine = commands.add_parser("engine", help="TensorRT engine (needs an NVIDIA GPU and tensorrt)")
    engine.add_argument("--onnx", required=True)
    engine.add_argument("--output", help="default: model.plan beside the ONNX file")
    _setting(engine, "--precision", ENGINE, "precision", choices=("fp16", "int8"))
    _setting(engine, "--min-batch", ENGINE, "min_batch", type=_positive_int)
    _setting(engine, "--opt-batch", ENGINE, "opt_batch", type=_positive_int)
    _setting(engine, "--max-batch", ENGINE, "max_batch", type=_positive_int)
    engine.set_defaults(func=_engine)

    build = commands.add_parser("build", help="train, prune, quantize, publish; report what each stage cost")
    build.add_argument("--config", help="YAML build file (flags override it)")
    # Flags override the build file; the defaults shown apply where neither sets a value.
    _setting(build, "--name", BUILD, "name", help="model name in the repository", dest="name", default=None)
    _setting(
        build,
        "--out",
        BUILD,
        "out_dir",
        help="build folder (report, artifacts)",
        dest="out_dir",
        default=None,
        metavar="OUT",
    )
    start = build.add_mutually_exclusive_group()
    start.add_argument("--checkpoint", help="start from this trained checkpoint instead of training")
    start.add_argument(
        "--onnx",
        help="start from this ONNX classifier (exported elsewhere: give its preprocessing flags and --dataset); "
        "no training, pruning or QAT",
    )
    _setting(
        build,
        "--dataset",
        TRAIN,
        "dataset",
        help="training data; with --onnx, the labelled images (one sub-folder per class) to calibrate and evaluate on",
        dest="dataset",
        default=None,
    )
    _setting(build, "--arch", TRAIN, "arch", choices=ARCHITECTURES, dest="arch", default=None)
    _setting(build, "--epochs", TRAIN, "epochs", type=_positive_int, dest="epochs", default=None)
    _setting(build, "--image-size", TRAIN, "image_size", type=_positive_int, dest="image_size", default=None)
    _setting(
        build,
        "--keep-ratio",
        PRUNE,
        "keep_ratio",
        type=float,
        help="pruning: fraction of MACs to keep",
        dest="keep_ratio",
        default=None,
    )
    _setting(
        build,
        "--calibration-images",
        QUANTIZE,
        "calibration_images",
        type=_positive_int,
        dest="calibration_images",
        default=None,
    )
    _setting(
        build,
        "--repository",
        BUILD,
        "repository",
        help="publish into this Triton repository",
        dest="repository",
        default=None,
    )
    build.add_argument("--target", choices=("cpu", "gpu"))
    _setting(
        build,
        "--max-accuracy-drop",
        BUILD,
        "max_accuracy_drop",
        type=float,
        help="top-1 points a stage may lose",
        dest="max_accuracy_drop",
        default=None,
    )
    _add_interface_arguments(build, "with --onnx; default: ONNX metadata, else the dataset's class folders")
    build.add_argument("--no-prune", action="store_true")
    build.add_argument("--no-quantize", action="store_true")
    build.add_argument("--no-publish", action="store_true")
    build.add_argument(
        "--no-reference",
        action="store_true",
        help="publish no NAME-reference (the FP32 model, compared with the served one on a share of requests)",
    )
    build.set_defaults(func=_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)  # a mistake exits here, with 2 and one line
    if unknown:  # named by the subcommand they were given to, which lists its own flags
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except BuilderError as e:
        # One line whatever the message carries (a library's error can span several).
        print(f"builder {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read the output went away (`| head`): nothing is wrong with the command. Standard output goes
        # to /dev/null so that the flush at exit fails no more (the signal module's note on SIGPIPE), and the
        # exit status is the shell's for a process a closed pipe stops (128 + SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # A file the command reads or writes: an unwritable output folder, a path under a file, a full disk.
        where = f" {e.filename}" if e.filename else ""
        print(f"builder {args.command}: error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"builder {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
