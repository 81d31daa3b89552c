"""Failures a user can cause. The CLI prints their message on one line and exits with code 2."""


class BuilderError(Exception):
    """Base class: bad input or a failed stage, with a message that says what to do."""


class DatasetError(BuilderError):
    """The dataset is missing, empty or unreadable."""


class CheckpointError(BuilderError):
    """A file is not a checkpoint this builder wrote."""


class ExportError(BuilderError):
    """Export failed, or the exported model disagrees with PyTorch."""


class PublishError(BuilderError):
    """The model cannot be published into the repository."""
