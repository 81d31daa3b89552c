"""`make gpu-check`: every GPU path of the builder, run on this machine's NVIDIA GPU in a few minutes, as one
table with a row per check: pass, fail, or skipped with the reason.

1. CUDA training with mixed precision: a ResNet-18 on digits, a few epochs through `builder.loop`.
2. Export parity on CUDA: the trained CUDA model exported to ONNX, ONNX Runtime (CPU) against torch (CUDA).
3. FP16 TensorRT engine (`builder.engine`), run by `builder.trt_runtime` at batch 1 and the profile's opt
   and max, against ONNX Runtime on the CPU.
4. INT8 TensorRT engine from `builder quantize --target gpu`'s file (NVIDIA Model Optimizer, explicit
   quantization): top-1 agreement with ONNX Runtime FP32.
5. Engine caches follow the weights: two versions of one architecture published for the GPU get different
   engine-cache identities, and their engines answer differently, each like its own weights.
6. Where `tritonserver` is on PATH: the `tensorrt_plan` model and the ONNX Runtime + TensorRT model load in
   Triton and answer like ONNX Runtime.
7. Where Triton has its DALI backend (NVIDIA's tritonserver container): `publish --preprocess gpu`'s ensemble
   takes JPEG bytes, decodes them with nvJPEG, and answers like the gateway's Pillow path + ONNX Runtime.

Every import a check needs happens inside it: a missing package or GPU skips the checks that need it, named
with what to install, and the others still run. Nothing is installed. Everything is written under one
temporary folder, removed at the end. Exit status 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import error_line

log = logging.getLogger(__name__)

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

# The tiny model: the project's smallest-input path (ResNet-18, stem adapted to 32 x 32) on scikit-learn's
# bundled digits, so nothing is downloaded.
ARCH = "resnet18"
DATASET = "digits"
DEVICE = "cuda"
EPOCHS = 3
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 0.05
# EngineConfig's defaults, spelled out: the profile the checks run at (batch 1, opt, max).
PROFILE = {"min_batch": 1, "opt_batch": 8, "max_batch": 32}
CALIBRATION_IMAGES = 128
# Across devices the same float32 graph sums in another order (cuDNN picks its convolution algorithm), so
# parity is held to 1e-3 here, TF32 off; `builder export`'s 1e-4 is for ONNX Runtime against torch on one CPU.
CUDA_PARITY_TOLERANCE = 1e-3
FP16_TOLERANCE = 1e-2
INT8_MIN_AGREEMENT = 0.95
# Two versions' outputs count as different beyond this: ten times what FP16 may drift.
WEIGHTS_CHANGED = 10 * FP16_TOLERANCE
TRITON_LOAD_TIMEOUT_S = 240

# pip's name for a module a check may miss, where it differs from the module's.
PIP_NAMES = {
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "tritonclient": "'tritonclient[grpc]'",
    "google": "protobuf",
    "grpc": "grpcio",
    "yaml": "pyyaml",
    "cuda": "cuda-python",
}


class Skip(Exception):
    """A check that cannot run here: the message names what is missing; `hints` say what to install."""

    def __init__(self, reason: str, hints: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hints = tuple(hints)


class CheckFailed(Exception):
    """A check ran and the GPU path did not do what it must."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # pass | fail | skipped
    detail: str
    seconds: float
    hints: tuple[str, ...] = ()


# A check takes the kit and returns what it measured (one line), or raises Skip, CheckFailed or anything else.
CheckFunction = Callable[["Kit"], str]


def check(title: str) -> Callable[[CheckFunction], CheckFunction]:
    """Name a check function for its row of the table."""

    def named(function: CheckFunction) -> CheckFunction:
        function.title = title  # type: ignore[attr-defined]
        return function

    return named


def title_of(function: CheckFunction) -> str:
    return getattr(function, "title", function.__name__)


# ---- what a check needs: each returns None, or (what is missing, what to install) ----

Need = Callable[[], "tuple[str, str | None] | None"]


# The kernel module's version file, present wherever an NVIDIA driver is loaded.
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class NvidiaDriver:
    version: str | None  # "560.35.03"
    cuda: str | None  # the newest CUDA it supports, as nvidia-smi prints it ("12.6")


def nvidia_driver() -> NvidiaDriver | None:
    """The NVIDIA driver on this machine, from nvidia-smi or the kernel module's version file; None if none."""
    smi = shutil.which("nvidia-smi")
    if smi is None and not NVIDIA_DRIVER_VERSION_FILE.exists():
        return None
    smi_text = module_text = ""
    if smi is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi_text = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    with contextlib.suppress(OSError):
        module_text = NVIDIA_DRIVER_VERSION_FILE.read_text()
    return read_nvidia_driver(smi_text, module_text)


def read_nvidia_driver(smi_text: str, module_text: str) -> NvidiaDriver:
    """The driver's version and CUDA from nvidia-smi's table, else the version from the kernel module's file."""
    version = _first(r"Driver Version:\s*([\d.]+)", smi_text) or _first(r"Kernel Module\s+([\d.]+)", module_text)
    return NvidiaDriver(version, _first(r"CUDA Version:\s*([\d.]+)", smi_text))


def _first(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1) if found else None


def cuda_unavailable(torch_version: str, torch_cuda: str, driver: NvidiaDriver | None) -> tuple[str, str | None]:
    """Why torch sees no GPU, and what to install: with a driver present, the usual cause is a torch built
    for a newer CUDA than the driver supports (CUDA's minor version compatibility stops at the major)."""
    if driver is None:
        return (
            "no NVIDIA GPU is visible (torch.cuda.is_available() is False)",
            "an NVIDIA GPU with its driver loaded (nvidia-smi lists it): every check needs one",
        )
    driver_text = f"NVIDIA driver {driver.version or '(version unread)'}"
    if driver.cuda:
        driver_text += f", which supports CUDA up to {driver.cuda},"
    reason = (
        f"torch {torch_version} is built for CUDA {torch_cuda} and torch.cuda.is_available() is False although "
        f"{driver_text} is present"
    )
    wanted = f"CUDA {driver.cuda} or older" if driver.cuda else "the CUDA the driver supports (nvidia-smi says)"
    hint = (
        f"install a torch built for {wanted} (https://pytorch.org/get-started/locally/, e.g. the cu126 index "
        f"the builder image uses), or a driver for CUDA {torch_cuda}"
    )
    return reason, hint


def need_cuda() -> tuple[str, str | None] | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed", "pip install torch (a CUDA build)"
    import torch

    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is built without CUDA",
            "install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
        )
    if not torch.cuda.is_available():
        return cuda_unavailable(torch.__version__, torch.version.cuda, nvidia_driver())
    return None


def need_tensorrt() -> tuple[str, str | None] | None:
    """TensorRT of the release the target Triton loads; the install line is the engine stage's own."""
    from . import engine
    from .errors import EngineError

    # The engine stage's importer says what to install; public where TensorRT's runtime lives in
    # builder.trt_runtime (and engine re-exports it), private before.
    import_tensorrt = getattr(engine, "import_tensorrt", None) or engine._import_tensorrt
    try:
        import tensorrt
    except ImportError:
        try:
            import_tensorrt()
        except EngineError as e:
            try:
                from .trt_runtime import install_hint as tensorrt_install_hint
            except ImportError:
                return "TensorRT is not installed", error_line(e)
            # Not the engine stage's whole line: its other way out (publish --target gpu) runs no check here.
            return "TensorRT is not installed", f"TensorRT (checks 3-6): {tensorrt_install_hint()}"
        return "TensorRT is not importable", None  # the importer got it after all: a broken install
    try:
        engine.check_tensorrt_version(getattr(tensorrt, "__version__", "unknown"))
    except EngineError as e:
        return f"TensorRT {getattr(tensorrt, '__version__', 'unknown')} is not the release Triton loads", error_line(e)
    return None


def need_trt_runtime() -> tuple[str, str | None] | None:
    try:
        importlib.import_module("builder.trt_runtime")
    except ModuleNotFoundError as e:
        if e.name == "builder.trt_runtime":
            return "builder.trt_runtime missing", None
        top = (e.name or "").split(".")[0]
        return f"builder.trt_runtime needs {top}, which is not installed", install_hint(top)
    return None


def modelopt_install_hint() -> str:
    """pip's line for the ModelOpt the builder extra pins, without extras: its `onnx` extra would bring
    numpy 2, onnxruntime-gpu and cupy into a venv whose Triton Python backend stub needs numpy<2."""
    requirement = "nvidia-modelopt"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for line in importlib.metadata.requires("triton-image-builder") or []:
            if re.match(r"nvidia-modelopt\b", line):
                requirement = line.split(";")[0].strip()
    return (
        f"pip install '{requirement}' (the builder extra's pin, without the [onnx] extra, which would bring "
        f"numpy 2, onnxruntime-gpu and cupy)"
    )


def install_hint(module: str) -> str:
    """What to install for a missing top-level module."""
    return modelopt_install_hint() if module == "modelopt" else f"pip install {PIP_NAMES.get(module, module)}"


def need_modelopt() -> tuple[str, str | None] | None:
    if importlib.util.find_spec("modelopt") is None:
        return "NVIDIA Model Optimizer is not installed", modelopt_install_hint()
    return None


def need_tritonserver() -> tuple[str, str | None] | None:
    if shutil.which("tritonserver") is None:
        return "tritonserver is not on PATH", (
            "tritonserver (checks 6, 7): run in NVIDIA's tritonserver container "
            "(nvcr.io/nvidia/tritonserver:24.10-py3) with torch (a CUDA build) and this project's builder "
            "packages installed in it, and tensorrt==10.5.* for check 6 (docs/gpu.md has the command)"
        )
    return None


# Where tritonserver looks for backends unless told otherwise (its --backend-directory default); NVIDIA's
# container has dali/ there, the nvidia-pytriton wheel's server does not.
TRITON_BACKENDS = Path("/opt/tritonserver/backends")


def need_dali_backend() -> tuple[str, str | None] | None:
    if not (TRITON_BACKENDS / "dali").is_dir():
        return (
            f"Triton's DALI backend is not installed ({TRITON_BACKENDS / 'dali'} is missing)",
            "Triton's DALI backend (check 7): NVIDIA's tritonserver container (nvcr.io/nvidia/tritonserver:24.10-py3) "
            "has it",
        )
    return None


def require(*needs: Need) -> None:
    """Skip, naming everything that is missing, unless every need is met."""
    missing = [found for found in (need() for need in needs) if found is not None]
    if missing:
        raise Skip("; ".join(reason for reason, _ in missing), [hint for _, hint in missing if hint])


# ---- the kit: a work folder, and what several checks share, made once ----


@dataclass
class Digits:
    dataset: Any  # builder.data.ImageDataset
    spec: Any  # server.preprocess.PreprocessSpec
    meta: Any  # builder.checkpoint.ModelMeta


@dataclass
class Trained:
    model: Any  # torch.nn.Module, on CUDA, eval mode
    losses: list[float]  # mean train loss per epoch
    steps: int
    val_accuracy: float


@dataclass
class Exported:
    onnx_path: Path
    max_abs_diff: float
    images: int


@dataclass
class Kit:
    """What the checks share: `dir`, their only place to write, and artifacts made on first use."""

    dir: Path
    _made: dict[str, tuple[bool, Any]] = field(default_factory=dict)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()`'s result, made once; a failure is reported again to every later check that needs it."""
        if key not in self._made:
            try:
                self._made[key] = (True, make())
            except Exception as e:
                self._made[key] = (False, e)
                raise
        made, value = self._made[key]
        if made:
            return value
        if isinstance(value, Skip):
            raise value
        raise CheckFailed(f"needs the {key}, which failed: {describe_error(value)}")

    def digits(self) -> Digits:
        return self.shared("digits dataset", _load_digits)

    def validation(self, count: int):
        """The first `count` validation images through the eval transform, NCHW float32 (numpy)."""
        images = self.shared("validation images", lambda: _validation_images(self.digits()))
        if count > len(images):
            raise CheckFailed(f"asked for {count} validation images, the split has {len(images)}")
        return images[:count]

    def trained(self) -> Trained:
        return self.shared("trained model", lambda: _train(self))

    def exported(self) -> Exported:
        return self.shared("CUDA export", lambda: _export(self, self.trained().model, self.dir / "fp32.onnx"))

    def other_weights(self) -> Exported:
        """The trained architecture with its classifier re-initialized: what a retrained version is to a cache."""
        return self.shared("other-weights export", lambda: _export_other_weights(self))

    def fp16_plan(self) -> Path:
        return self.shared("FP16 engine", lambda: _build(self.exported().onnx_path, self.dir / "fp16", "fp16"))

    def ort_logits(self, onnx_path: Path, images):
        import numpy as np
        import onnxruntime as ort

        session = self.shared(
            f"ONNX Runtime session for {Path(onnx_path).resolve()}",
            lambda: ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),
        )
        (logits,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(images)})
        return logits


def _load_digits() -> Digits:
    from .checkpoint import ModelMeta
    from .data import load_dataset, resolve_spec

    dataset = load_dataset(DATASET)
    spec = resolve_spec(dataset)
    meta = ModelMeta(
        arch=ARCH,
        num_classes=len(dataset.classes),
        in_channels=spec.channels,
        image_size=spec.image_size,
        classes=tuple(dataset.classes),
        preprocess=spec,
        config={"dataset": DATASET, "val_fraction": 0.2, "seed": 0},
    )
    return Digits(dataset, spec, meta)


def _validation_images(digits: Digits):
    from .transforms import validation_images

    return validation_images(digits.spec, digits.dataset, len(digits.dataset.val)).numpy()


def _train(kit: Kit) -> Trained:
    """A few epochs of the project's training step on CUDA with AMP (GradScaler, autocast), then eval."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from .loop import evaluate_loader, seed_everything, train_one_epoch
    from .models import create_model
    from .schedules import warmup_cosine
    from .transforms import eval_transform

    digits = kit.digits()
    dataset, spec = digits.dataset, digits.spec
    seed_everything(0)
    transform = eval_transform(spec)
    train_images = torch.stack(
        [transform(dataset.train.image(i, dataset.color_mode)) for i in range(len(dataset.train))]
    )
    loader = DataLoader(
        TensorDataset(train_images, torch.tensor(dataset.train.labels)),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val_loader = DataLoader(
        TensorDataset(torch.from_numpy(kit.validation(len(dataset.val))), torch.tensor(dataset.val.labels)),
        batch_size=BATCH_SIZE,
    )
    model = create_model(
        ARCH, num_classes=len(dataset.classes), in_channels=spec.channels, image_size=spec.image_size
    ).to(DEVICE)
    steps = EPOCHS * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=len(loader), total_steps=steps)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=True)
    losses = [
        train_one_epoch(model, loader, optimizer, scheduler, criterion, device=DEVICE, scaler=scaler)["train_loss"]
        for _ in range(EPOCHS)
    ]
    accuracy = evaluate_loader(model, val_loader, len(dataset.classes), device=DEVICE)["val_accuracy"]
    model.eval()
    return Trained(model, losses, steps, accuracy)


def _export_other_weights(kit: Kit) -> Exported:
    import torch

    other = copy.deepcopy(kit.trained().model)
    torch.manual_seed(1)
    other.fc.reset_parameters()  # one architecture, other weights
    return _export(kit, other, kit.dir / "other-weights.onnx")


@contextlib.contextmanager
def _float32_convolutions() -> Iterator[None]:
    """cuDNN and cuBLAS in full float32 (no TF32, which keeps 10 mantissa bits), as before afterwards."""
    import torch

    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _export(kit: Kit, model, output: Path) -> Exported:
    """The export stage's steps (TorchScript export with a dynamic batch axis, onnxslim, the metadata) on a
    model that lives on CUDA, then ONNX Runtime on the CPU against torch on CUDA on validation images.
    (`builder.export.export_model` checks parity with CPU tensors, so it takes models on the CPU only.)"""
    import numpy as np
    import onnx
    import torch

    from .onnx_graph import simplify_graph, torch_to_onnx
    from .onnx_meta import onnx_metadata, set_metadata

    images = kit.validation(32)
    batch = torch.from_numpy(images).to(DEVICE)
    output.parent.mkdir(parents=True, exist_ok=True)
    proto = simplify_graph(torch_to_onnx(model, batch[:1], output))
    set_metadata(proto, onnx_metadata(kit.digits().meta, None))
    onnx.save(proto, str(output))
    with torch.no_grad(), _float32_convolutions():
        expected = model(batch).float().cpu().numpy()
    difference = float(np.max(np.abs(kit.ort_logits(output, images) - expected)))
    return Exported(output, difference, len(images))


def _build(onnx_path: Path, folder: Path, precision: str, **profile: int) -> Path:
    from .engine import EngineConfig, build_engine

    config = EngineConfig(precision=precision, **{**PROFILE, **profile})
    return Path(build_engine(onnx_path, folder / "model.plan", config))


@contextlib.contextmanager
def _runner(plan: Path) -> Iterator[Any]:
    from .trt_runtime import EngineRunner

    runner = EngineRunner(plan)
    try:
        yield runner
    finally:
        close = getattr(runner, "close", None)
        if callable(close):
            close()


def _engine_logits(runner, images):
    import numpy as np

    logits = np.asarray(runner.infer(images))
    if logits.shape[0] != len(images):
        raise CheckFailed(f"the engine answered {logits.shape[0]} rows for a batch of {len(images)}")
    return logits


def _max_abs(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        raise CheckFailed(f"output shapes differ: {a.shape} and {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# ---- the checks ----


@check("1 CUDA training, AMP (builder.loop)")
def check_cuda_training(kit: Kit) -> str:
    require(need_cuda)
    import torch

    run = kit.trained()
    first, last = run.losses[0], run.losses[-1]
    if not all(math.isfinite(loss) for loss in run.losses):
        raise CheckFailed(f"train loss per epoch {', '.join(f'{loss:.4f}' for loss in run.losses)}: not finite")
    if not last < first:
        raise CheckFailed(f"train loss did not fall over {run.steps} steps: {first:.4f} -> {last:.4f}")
    return (
        f"{run.steps} steps on {torch.cuda.get_device_name()}: loss {first:.3f} -> {last:.3f}, "
        f"val top-1 {run.val_accuracy:.1%}"
    )


@check("2 Export parity on CUDA")
def check_export_parity(kit: Kit) -> str:
    require(need_cuda)
    exported = kit.exported()
    summary = f"max |ONNX Runtime CPU - torch CUDA| {exported.max_abs_diff:.1e} on {exported.images} images"
    if not exported.max_abs_diff <= CUDA_PARITY_TOLERANCE:
        raise CheckFailed(f"{summary} (> {CUDA_PARITY_TOLERANCE:.0e})")
    return f"{summary} (<= {CUDA_PARITY_TOLERANCE:.0e})"


@check("3 FP16 TensorRT engine")
def check_fp16_engine(kit: Kit) -> str:
    require(need_cuda, need_tensorrt, need_trt_runtime)
    onnx_path = kit.exported().onnx_path
    differences = {}
    with _runner(kit.fp16_plan()) as runner:
        _, opt, high = runner.profile
        for batch in sorted({1, opt, high}):
            images = kit.validation(batch)
            differences[batch] = _max_abs(_engine_logits(runner, images), kit.ort_logits(onnx_path, images))
    summary = ", ".join(f"batch {batch}: {difference:.1e}" for batch, difference in differences.items())
    summary = f"max |TensorRT FP16 - ONNX Runtime CPU| {summary}"
    if not all(difference <= FP16_TOLERANCE for difference in differences.values()):
        raise CheckFailed(f"{summary} (> {FP16_TOLERANCE:.0e})")
    return f"{summary} (<= {FP16_TOLERANCE:.0e})"


@check("4 INT8 TensorRT engine (ModelOpt)")
def check_int8_engine(kit: Kit) -> str:
    require(need_cuda, need_tensorrt, need_trt_runtime, need_modelopt)
    import numpy as np

    from .quantize import QuantizeConfig, quantize_int8

    fp32 = kit.exported().onnx_path
    quantized = quantize_int8(
        fp32,
        kit.dir / "int8-gpu.onnx",
        QuantizeConfig(target="gpu", calibration_images=CALIBRATION_IMAGES),
        dataset=kit.digits().dataset,
    ).onnx_path
    plan = _build(quantized, kit.dir / "int8", "int8")
    images = kit.validation(len(kit.digits().dataset.val))
    with _runner(plan) as runner:
        high = runner.profile[2]
        engine = np.concatenate([_engine_logits(runner, images[i : i + high]) for i in range(0, len(images), high)])
    reference = kit.ort_logits(fp32, images).argmax(axis=1)
    agreement = float(np.mean(engine.argmax(axis=1) == reference))
    on_cpu = float(np.mean(kit.ort_logits(quantized, images).argmax(axis=1) == reference))
    summary = (
        f"top-1 agrees with ONNX Runtime FP32 on {agreement:.1%} of {len(images)} images "
        f"(the INT8 file on ONNX Runtime CPU: {on_cpu:.1%})"
    )
    if not agreement >= INT8_MIN_AGREEMENT:
        raise CheckFailed(f"{summary}; needs >= {INT8_MIN_AGREEMENT:.0%}")
    return summary


@check("5 Engine caches follow the weights")
def check_engine_caches(kit: Kit) -> str:
    require(need_cuda, need_tensorrt, need_trt_runtime)
    import onnx

    from .publish import PublishSettings, publish

    sources = [kit.exported().onnx_path, kit.other_weights().onnx_path]
    settings = PublishSettings(target="gpu", trt_cache_path=str(kit.dir / "ort-trt-cache" / "cache-check"))
    versions = [publish(source, kit.dir / "repository", "cache-check", settings=settings) for source in sources]
    published = [version.version_dir / "model.onnx" for version in versions]
    names = [onnx.load(str(path), load_external_data=False).graph.name for path in published]
    if names[0] == names[1]:
        raise CheckFailed(f"versions 1 and 2 share the engine-cache identity {names[0]!r}")
    images = kit.validation(PROFILE["opt_batch"])
    expected = [kit.ort_logits(path, images) for path in published]
    if not _max_abs(expected[0], expected[1]) > WEIGHTS_CHANGED:
        raise CheckFailed("the two versions' weights give the same outputs on ONNX Runtime: nothing to tell apart")
    answers = []
    for index, path in enumerate(published):
        with _runner(_build(path, kit.dir / f"cache-v{index + 1}", "fp16", max_batch=PROFILE["opt_batch"])) as runner:
            answers.append(_engine_logits(runner, images))
    for index in range(2):
        own, others = _max_abs(answers[index], expected[index]), _max_abs(answers[index], expected[1 - index])
        if not (own <= FP16_TOLERANCE and others > WEIGHTS_CHANGED):
            raise CheckFailed(
                f"version {index + 1}'s engine is {own:.1e} from its own weights' outputs and {others:.1e} "
                "from the other version's"
            )
    provider = _ort_tensorrt_cache(kit, published, images, expected)
    return f"graph names {names[0][:15]}... / {names[1][:15]}...; each engine answers like its weights; {provider}"


def _ort_tensorrt_cache(kit: Kit, published: list[Path], images, expected) -> str:
    """Where ONNX Runtime has its TensorRT provider: both versions through one engine-cache folder, as
    Triton runs them; the second must not answer with the first one's cached engine."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime's TensorRT provider is not available here (onnxruntime-gpu): its cache not tried"
    cache = kit.dir / "ort-trt-cache" / "shared"
    cache.mkdir(parents=True, exist_ok=True)
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": True}
    for index, path in enumerate(published):
        session = ort.InferenceSession(str(path), providers=[("TensorrtExecutionProvider", options)])
        if session.get_providers()[0] != "TensorrtExecutionProvider":
            # ONNX Runtime falls back to another provider where it cannot load TensorRT's libraries: a setup
            # matter of this machine, not of the published model.
            return f"ONNX Runtime's TensorRT provider did not start here ({', '.join(session.get_providers())})"
        (logits,) = session.run(None, {session.get_inputs()[0].name: images})
        difference = _max_abs(logits, expected[index])
        if not difference <= FP16_TOLERANCE:
            raise CheckFailed(
                f"ONNX Runtime's TensorRT provider answered version {index + 1} {difference:.1e} away from its "
                "weights (a cached engine of the other version?)"
            )
    engines = sorted(p.name for p in cache.iterdir() if p.suffix == ".engine")
    return f"ONNX Runtime's TensorRT provider cached {len(engines)} engines, each version answered by its own"


@check("6 Triton: plan and ORT+TensorRT models")
def check_triton(kit: Kit) -> str:
    require(need_cuda, need_tensorrt, need_tritonserver)
    from .publish import PublishSettings, publish, publish_plan

    onnx_path = kit.exported().onnx_path
    repository = kit.dir / "triton-repository"
    cache_root = kit.dir / "triton-trt-cache"
    cache_root.mkdir(parents=True)
    publish_plan(kit.fp16_plan(), onnx_path, repository, "gpu_check_plan", settings=PublishSettings(target="gpu"))
    publish(
        onnx_path,
        repository,
        "gpu_check_onnx_trt",
        settings=PublishSettings(target="gpu", trt_cache_path=str(cache_root / "gpu_check_onnx_trt")),
    )
    images = kit.validation(PROFILE["opt_batch"])
    expected = kit.ort_logits(onnx_path, images)
    differences = {}
    with _tritonserver(repository, kit.dir / "tritonserver.log") as url:
        states = _model_states(url)
        for name in ("gpu_check_plan", "gpu_check_onnx_trt"):
            state, reason = states.get(name, ("MISSING", "not in the repository index"))
            if state != "READY":
                raise CheckFailed(f"{name} did not load in Triton ({state}): {(reason or state).splitlines()[0]}")
            differences[name] = _max_abs(_triton_infer(url, name, images), expected)
    found = ", ".join(f"{name} {difference:.1e}" for name, difference in differences.items())
    summary = f"max |Triton - ONNX Runtime CPU| at batch {len(images)}: {found}"
    if not all(difference <= FP16_TOLERANCE for difference in differences.values()):
        raise CheckFailed(f"{summary} (> {FP16_TOLERANCE:.0e})")
    return f"{summary} (<= {FP16_TOLERANCE:.0e}); {_second_version_in_triton(kit, repository, images, expected)}"


def _second_version_in_triton(kit: Kit, repository: Path, images, first_expected) -> str:
    """Version 2 with other weights, published beside version 1 into the same engine-cache folder, which now
    holds version 1's engine: Triton's ONNX Runtime + TensorRT model must answer with version 2's weights,
    as after a retrain in production (ONNX Runtime names cached engines by graph name, not weights)."""
    from .publish import PublishSettings, publish

    name = "gpu_check_onnx_trt"
    cache = kit.dir / "triton-trt-cache" / name
    engines_before = _engine_files(cache)
    source = kit.other_weights().onnx_path
    version = publish(source, repository, name, settings=PublishSettings(target="gpu", trt_cache_path=str(cache)))
    expected = kit.ort_logits(version.version_dir / "model.onnx", images)
    if not _max_abs(expected, first_expected) > WEIGHTS_CHANGED:
        raise CheckFailed("the two versions' weights give the same outputs on ONNX Runtime: nothing to tell apart")
    with _tritonserver(repository, kit.dir / "tritonserver-v2.log") as url:
        state, reason = _model_states(url, version.version).get(name, ("MISSING", "not in the repository index"))
        if state != "READY":
            raise CheckFailed(f"{name} version {version.version} did not load ({state}): {reason.splitlines()[0]}")
        answer = _triton_infer(url, name, images, version=version.version)
    own, first = _max_abs(answer, expected), _max_abs(answer, first_expected)
    if not (own <= FP16_TOLERANCE and first > WEIGHTS_CHANGED):
        raise CheckFailed(
            f"version {version.version} answered {own:.1e} from its own weights' outputs and {first:.1e} from "
            f"version 1's (its engine came from the cache of version 1?)"
        )
    engines = _engine_files(cache)
    return (
        f"version {version.version} (other weights, same cache folder) answered like its own weights "
        f"({own:.1e}), engines cached {len(engines_before)} -> {len(engines)}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else None


def _last_error(log_path: Path) -> str:
    """The last line Triton logged as an error (its lines start E<month><day>), else its last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line[:1] == "E" and line[1:5].isdigit()]
    return (errors or lines or ["no output"])[-1]


@contextlib.contextmanager
def _tritonserver(repository: Path, log_path: Path) -> Iterator[str]:
    """tritonserver on 127.0.0.1 (HTTP only) with every model of `repository`; its URL once it serves."""
    port = _free_port()
    command = [
        "tritonserver",
        f"--model-repository={repository}",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--exit-on-error=false",  # serve the models that load, and say why the others did not
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # Triton serves HTTP once every model has loaded or failed to (engines are built while loading).
            deadline = time.monotonic() + TRITON_LOAD_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise CheckFailed(f"tritonserver exited ({process.returncode}): {_last_error(log_path)}")
                try:
                    _http(f"{url}/v2/health/live", timeout=2)
                    break
                except (OSError, urllib.error.URLError):
                    pass
                if time.monotonic() > deadline:
                    raise CheckFailed(f"tritonserver did not serve within {TRITON_LOAD_TIMEOUT_S} s")
                time.sleep(1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _engine_files(folder: Path) -> set[str]:
    """The engines ONNX Runtime's TensorRT provider cached in `folder` (none where it made no folder)."""
    return {p.name for p in folder.iterdir() if p.suffix == ".engine"} if folder.is_dir() else set()


def _model_states(url: str, version: int | None = None) -> dict[str, tuple[str, str]]:
    """Model name -> (state, reason) from Triton's repository index; of one version where it lists several."""
    return {
        entry["name"]: (entry.get("state", ""), entry.get("reason", ""))
        for entry in _http(f"{url}/v2/repository/index", body={})
        if version is None or entry.get("version") in (None, str(version))
    }


def _triton_infer(
    url: str,
    name: str,
    images,
    datatype: str = "FP32",
    input_name: str | None = None,
    output_name: str | None = None,
    version: int | None = None,
):
    import numpy as np

    from .onnx_graph import INPUT_NAME

    body: dict[str, Any] = {
        "inputs": [
            {
                "name": input_name or INPUT_NAME,
                "shape": list(images.shape),
                "datatype": datatype,
                "data": images.ravel().tolist(),
            }
        ]
    }
    if output_name:
        body["outputs"] = [{"name": output_name}]
    model = f"{name}/versions/{version}" if version is not None else name
    (output,) = _http(f"{url}/v2/models/{model}/infer", body=body)["outputs"][:1]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


# The GPU decode path against the gateway's: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so
# pixels may move by a few levels; what must hold is the classification.
DALI_MIN_AGREEMENT = 0.95
DALI_MAX_MEAN_LEVELS = 2.0
DALI_IMAGES = 16


@check("7 Triton: DALI preprocessing ensemble")
def check_dali_ensemble(kit: Kit) -> str:
    require(need_cuda, need_tritonserver, need_dali_backend)
    import io

    import numpy as np

    from server.preprocess import encoded_batch, preprocess_bytes

    from .dali_preprocess import OUTPUT_NAME, model_names
    from .publish import PublishSettings, publish

    onnx_path = kit.exported().onnx_path
    digits = kit.digits()
    spec = digits.spec
    repository = kit.dir / "dali-repository"
    # The classifier on ONNX Runtime's backend, as in check 6: the container's Python has no onnxruntime for
    # the Python backend's model.py.
    (kit.dir / "dali-trt-cache").mkdir(parents=True)
    settings = PublishSettings(
        target="gpu", preprocess="gpu", warmup=False, trt_cache_path=str(kit.dir / "dali-trt-cache")
    )
    publish(onnx_path, repository, "gpu_check_dali", settings=settings)
    preprocess_name, ensemble_name = model_names("gpu_check_dali")
    images = []
    for i in range(DALI_IMAGES):
        buffer = io.BytesIO()
        digits.dataset.val.image(i, "RGB").resize((96, 96)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    gateway_inputs = np.stack([preprocess_bytes(data, spec) for data in images])
    expected = kit.ort_logits(onnx_path, gateway_inputs)
    batch, _ = encoded_batch(images, max_pixels=10**8)
    with _tritonserver(repository, kit.dir / "tritonserver-dali.log") as url:
        states = _model_states(url)
        for name in (preprocess_name, ensemble_name):
            state, reason = states.get(name, ("MISSING", "not in the repository index"))
            if state != "READY":
                raise CheckFailed(f"{name} did not load in Triton ({state}): {(reason or state).splitlines()[0]}")
        served_inputs = _triton_infer(url, preprocess_name, batch, "UINT8", "IMAGE_BYTES", OUTPUT_NAME)
        served = _triton_infer(url, ensemble_name, batch, "UINT8", "IMAGE_BYTES")
    levels = np.abs(served_inputs - gateway_inputs) * 255 * np.asarray(spec.std, dtype=np.float32)[:, None, None]
    agreement = float((served.argmax(axis=1) == expected.argmax(axis=1)).mean())
    summary = (
        f"{len(images)} JPEGs: inputs {levels.max():.1f} levels of 255 apart at most, {levels.mean():.2f} on average; "
        f"top-1 agreement with the gateway + ONNX Runtime {agreement:.0%}, max |logits| difference "
        f"{_max_abs(served, expected):.1e}"
    )
    if agreement < DALI_MIN_AGREEMENT or levels.mean() > DALI_MAX_MEAN_LEVELS:
        raise CheckFailed(f"{summary} (needs >= {DALI_MIN_AGREEMENT:.0%}, mean <= {DALI_MAX_MEAN_LEVELS})")
    return summary


CHECKS: tuple[CheckFunction, ...] = (
    check_cuda_training,
    check_export_parity,
    check_fp16_engine,
    check_int8_engine,
    check_engine_caches,
    check_triton,
    check_dali_ensemble,
)


# ---- running and reporting ----


def describe_error(exc: BaseException) -> str:
    """One line: the message of a failure that says what happened, with its type where the type says more."""
    if isinstance(exc, CheckFailed) or type(exc).__module__.startswith("builder."):
        return error_line(exc)
    return f"{type(exc).__name__}: {error_line(exc)}"


def run_check(function: CheckFunction, kit: Kit) -> CheckResult:
    started = time.monotonic()
    try:
        detail = function(kit)
    except Skip as e:
        return CheckResult(title_of(function), SKIPPED, e.reason, time.monotonic() - started, e.hints)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if e.name == "builder.trt_runtime":  # being written beside this kit; what imports it waits for it
            return CheckResult(title_of(function), SKIPPED, "builder.trt_runtime missing", time.monotonic() - started)
        if top and top not in ("builder", "server"):
            return CheckResult(
                title_of(function), SKIPPED, f"{top} is not installed", time.monotonic() - started, (install_hint(top),)
            )
        return CheckResult(title_of(function), FAIL, describe_error(e), time.monotonic() - started)
    except Exception as e:
        log.debug("%s failed", title_of(function), exc_info=True)
        return CheckResult(title_of(function), FAIL, describe_error(e), time.monotonic() - started)
    return CheckResult(title_of(function), PASS, detail, time.monotonic() - started)


def run_checks(checks: Sequence[CheckFunction] = CHECKS) -> list[CheckResult]:
    """Every check in order, in one temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        kit = Kit(Path(folder))
        return [run_check(function, kit) for function in checks]


def describe_environment() -> str:
    """What this machine has, in one line, each part only where it can be read."""
    parts = [f"Python {platform.python_version()}"]
    with contextlib.suppress(Exception):
        import torch

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        parts.append(f"torch {torch.__version__} ({cuda})")
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            parts.append(f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})")
    for module, label in (("tensorrt", "TensorRT"), ("onnxruntime", "ONNX Runtime")):
        with contextlib.suppress(Exception):
            if importlib.util.find_spec(module) is not None:
                parts.append(f"{label} {importlib.import_module(module).__version__}")
    parts.append(f"tritonserver {shutil.which('tritonserver') or 'not on PATH'}")
    return ", ".join(parts)


def render(results: Sequence[CheckResult], environment: str = "") -> str:
    """The table (rich where it is installed, plain text otherwise), then what to install for the skips."""
    rows = [(r.name, r.status, f"{r.seconds:.1f}", r.detail) for r in results]
    header = ("check", "result", "s", "detail")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
            for row in [header, *rows]
        ]
        table = "\n".join(line.rstrip() for line in lines)
    else:
        grid = Table(title="GPU check", title_justify="left")
        for column in header:
            grid.add_column(column, overflow="fold")
        colours = {PASS: "green", FAIL: "red", SKIPPED: "yellow"}
        for name, status, seconds, detail in rows:
            grid.add_row(name, f"[{colours[status]}]{status}[/]", seconds, detail)
        console = Console(width=max(shutil.get_terminal_size((120, 24)).columns, 100))
        with console.capture() as captured:
            console.print(grid)
        table = captured.get().rstrip()
    hints = list(dict.fromkeys(hint for r in results if r.status == SKIPPED for hint in r.hints))
    footer = ["What the skipped checks need:", *(f"  {hint}" for hint in hints)] if hints else []
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIPPED)}
    summary = f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped"
    return "\n".join(part for part in (environment, table, *footer, summary) if part)


def main(argv: Sequence[str] | None = None, checks: Sequence[CheckFunction] = CHECKS) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m builder.gpu_check",
        description="Run every GPU path of the builder on this machine's NVIDIA GPU; one table of results. "
        "Exit status 1 when a check failed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="the stages' log lines and failures' tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    results = run_checks(checks)
    print(render(results, describe_environment()))
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
