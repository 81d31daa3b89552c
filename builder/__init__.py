"""builder: train image classifiers, export them and publish them into a Triton model repository."""

__version__ = "0.1.0"
