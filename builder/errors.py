"""Failures a user can cause. The CLI prints their message on one line and exits with code 2.

Every stage's error type lives here, so that the shared layer can raise them without importing a stage.
"""


class BuilderError(Exception):
    """Base class: bad input or a failed stage, with a message that says what to do."""


class DatasetError(BuilderError):
    """The dataset is missing, empty or unreadable."""


class CheckpointError(BuilderError):
    """A file is not a checkpoint this builder wrote."""


class OnnxFileError(BuilderError):
    """A file that should be an ONNX model is missing or is not one."""


class TrainError(BuilderError):
    """A training setting cannot be used as given."""


class LossError(BuilderError):
    """A loss or class-weight setting cannot be used."""


class TuneError(BuilderError):
    """The search cannot run as asked."""


class PruneError(BuilderError):
    """The model cannot be pruned as asked."""


class QuantizeError(BuilderError):
    """The model cannot be quantized as asked."""


class QATError(BuilderError):
    """Quantization-aware training cannot run, or its export does not match PyTorch."""


class ExportError(BuilderError):
    """Export failed, or the exported model disagrees with PyTorch."""


class EngineError(BuilderError):
    """A TensorRT engine cannot be built here, or a plan's record is missing."""


class PublishError(BuilderError):
    """The model cannot be published into the repository."""


class RolloutError(BuilderError):
    """A rollout cannot start or move on as asked."""


class DegradeError(BuilderError):
    """A model's degradation to a faster one cannot be set as asked."""


class BudgetError(BuilderError):
    """A stage lost more accuracy than the budget allows."""


def error_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries write pages), or its type when it has none."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
