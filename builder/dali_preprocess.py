"""`builder publish --preprocess gpu`: beside the classifier, a preprocessing model for Triton's DALI backend
and an ensemble that chains the two, so that encoded images go to Triton as they came and are decoded
there with nvJPEG.

    model_repository/NAME/...                      the classifier, as publish writes it anyway
    model_repository/NAME-preprocess/config.pbtxt  backend "dali": UINT8 [-1] bytes -> FP32 C x H x W
    model_repository/NAME-preprocess/<v>/dali.py   the pipeline (builder/backend/dali.py), with
    model_repository/NAME-preprocess/<v>/preprocess.json   the spec it reads
    model_repository/NAME-ensemble/config.pbtxt    platform "ensemble": bytes -> logits, with the spec and
                                                   labels parameters the gateway reads
    model_repository/NAME-ensemble/<v>/            empty: Triton wants a version folder for an ensemble

Configs as the DALI backend's README (r24.10) and its efficientnet ensemble example write them; Triton's
ensemble docs (user_guide/architecture.md, "Ensemble Models"). The gateway sends a model whose input is
UINT8 [-1] the encoded bytes (server/triton.py).

No DALI import here: publishing checks and writes files; only tests and `make gpu-check` run the pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

from server.preprocess import ENCODED_INPUT_DIMS, PreprocessSpec

from . import model_config
from .errors import PublishError

DALI_MODEL = Path(__file__).parent / "backend" / "dali.py"
# As builder/backend/dali.py names them (that file imports DALI, so it is not imported here).
INPUT_NAME = "IMAGE_BYTES"
OUTPUT_NAME = "PREPROCESSED"
SPEC_FILE = "preprocess.json"
PREPROCESS_SUFFIX = "-preprocess"
ENSEMBLE_SUFFIX = "-ensemble"
# CPU threads of the pipeline (the parts that stay on the CPU: reading headers, the external source); the
# DALI backend's `num_threads` model parameter (its docs/config.md).
DALI_THREADS = 4
PREPROCESS_CHOICES = ("cpu", "gpu")


def model_names(name: str) -> tuple[str, str]:
    """The preprocessing model's and the ensemble's names for classifier `name`."""
    return f"{name}{PREPROCESS_SUFFIX}", f"{name}{ENSEMBLE_SUFFIX}"


def is_companion(model_dir: Path, classifier: str) -> bool:
    """Whether `model_dir` is what an earlier `--preprocess gpu` publish of `classifier` wrote there: a DALI
    model, or an ensemble with a step running `classifier`. Anything else is another model, not ours to replace."""
    try:
        config = model_config.parse((model_dir / "config.pbtxt").read_text())
    except (OSError, ValueError):  # text_format.ParseError is a ValueError
        return False
    if model_dir.name.endswith(PREPROCESS_SUFFIX):
        return config.backend == "dali"
    return config.platform == "ensemble" and any(step.model_name == classifier for step in config.ensemble_steps)


def check_destinations(repository: Path, name: str) -> None:
    """PublishError, before anything is written, where a companion model of `name` cannot be written: another
    model of that name, a file in the way, or a folder this user cannot write to."""
    for companion in model_names(name):
        model_dir = repository / companion
        if not model_dir.exists():
            if repository.is_dir() and not os.access(repository, os.W_OK | os.X_OK):
                raise PublishError(f"cannot write to model repository {repository}: it is not writable")
            continue
        if not model_dir.is_dir():
            raise PublishError(f"--preprocess gpu writes model {companion}, but {model_dir} is a file in the way")
        if not is_companion(model_dir, name):
            raise PublishError(
                f"--preprocess gpu writes model {companion}, but {model_dir} holds another model: "
                f"publish under another --name or remove it"
            )
        if not os.access(model_dir, os.W_OK | os.X_OK):
            raise PublishError(f"cannot write to model repository {repository}: {model_dir} is not writable")


def local_stack_lacks_dali(repository: Path) -> bool:
    """Whether `repository` is the one the local stack serves (TRITON_MODEL_REPOSITORY) and the stack's Triton,
    the nvidia-pytriton wheel's, has no DALI backend: there the DALI model and the ensemble cannot load. As much
    as is known without asking a server (Triton's API lists no backends)."""
    from stack.settings import TritonSettings

    if Path(TritonSettings().model_repository).resolve() != repository.resolve():
        return False
    wheel = importlib.util.find_spec("pytriton")  # found, not imported: the package's import is slow
    if wheel is None or not wheel.submodule_search_locations:
        return False
    backends = Path(next(iter(wheel.submodule_search_locations))) / "tritonserver" / "backends"
    return backends.is_dir() and not (backends / "dali").is_dir()


def check_applicable(spec: PreprocessSpec, *, pixel_input: bool, batching: bool, canary: bool) -> None:
    """PublishError where the GPU path cannot make what the gateway would for this model."""
    if pixel_input:
        raise PublishError(
            "--preprocess gpu makes the normalized float input itself; a --pixel-input model takes "
            "uint8 pixels: publish it without one of the two"
        )
    if spec.equalize:
        raise PublishError(
            "--preprocess gpu: the model's preprocessing equalizes histograms, which the DALI pipeline "
            "does not do as Pillow does; publish it with the gateway's preprocessing"
        )
    if not batching:
        raise PublishError(
            "--preprocess gpu needs a model with a dynamic batch axis (the DALI backend batches); export it with one"
        )
    if canary:
        raise PublishError(
            "--preprocess gpu with --canary: the ensemble runs the classifier's newest version, not a "
            "rollout's split; publish the canary without --preprocess gpu"
        )


def preprocess_config(
    name: str, spec: PreprocessSpec, max_batch_size: int, queue: model_config.DynamicBatching | None
) -> model_config.ModelConfig:
    """The DALI model: encoded images in (ragged: any lengths batch together), the classifier's input out."""
    return model_config.ModelConfig(
        name=name,
        backend="dali",
        inputs=(model_config.TensorSpec(INPUT_NAME, ENCODED_INPUT_DIMS, data_type="UINT8", allow_ragged_batch=True),),
        outputs=(model_config.TensorSpec(OUTPUT_NAME, spec.input_shape),),
        max_batch_size=max_batch_size,
        dynamic_batching=queue,
        # One instance: the backend's README (Known limitations) warns of DALI's memory use with more.
        instance_count=1,
        instance_kind="KIND_GPU",
        parameters={"num_threads": str(DALI_THREADS)},
    )


def ensemble_config(
    name: str,
    classifier: model_config.ModelConfig,
    preprocess_name: str,
    spec: PreprocessSpec,
    labels: Sequence[str],
    interface_parameters: dict[str, str],
) -> model_config.ModelConfig:
    """Bytes -> the preprocessing model -> the classifier; its outputs are the classifier's."""
    preprocessed = "preprocessed_image"
    outputs = tuple(
        model_config.TensorSpec(t.name, t.dims, t.data_type, label_filename=t.label_filename)
        for t in classifier.outputs
    )
    return model_config.ModelConfig(
        name=name,
        platform="ensemble",
        backend="",
        inputs=(model_config.TensorSpec(INPUT_NAME, ENCODED_INPUT_DIMS, data_type="UINT8"),),
        outputs=outputs,
        max_batch_size=classifier.max_batch_size,
        dynamic_batching=None,
        parameters=interface_parameters,
        ensemble_steps=(
            model_config.EnsembleStep(preprocess_name, {INPUT_NAME: INPUT_NAME}, {OUTPUT_NAME: preprocessed}),
            model_config.EnsembleStep(
                classifier.name,
                {classifier.inputs[0].name: preprocessed},
                {t.name: t.name for t in classifier.outputs},
            ),
        ),
    )


def write_spec(spec: PreprocessSpec, path: Path) -> Path:
    path.write_text(json.dumps(spec.to_dict(), indent=2))
    return path
