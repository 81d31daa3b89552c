"""Quantization: its settings and a file that is not ONNX."""

import pytest

from builder.errors import OnnxFileError
from builder.quantize import QuantizeConfig, QuantizeError, quantize_int8


def test_unknown_calibration_method_lists_the_choices():
    with pytest.raises(QuantizeError, match="minmax, entropy, percentile"):
        QuantizeConfig(method="mse")


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OnnxFileError, match="not an ONNX model"):
        quantize_int8(tmp_path / "x.onnx", tmp_path / "int8.onnx")
    assert not (tmp_path / "int8.onnx").exists()
