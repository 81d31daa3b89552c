"""The builder's error types and one-line messages; the ONNX file error is checked at every reader that raises it."""

from __future__ import annotations

import pytest

from builder.errors import BuilderError, OnnxFileError, error_line
from builder.onnx_meta import load_onnx


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage" * 10, b"PK\x03\x04 not a model"])
def test_a_file_that_is_not_onnx_raises_one_error_type_everywhere(tmp_path, content):
    from builder.evaluate import onnx_session
    from builder.publish import inspect_onnx
    from builder.quantize import quantize_int8

    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    for reader in (load_onnx, onnx_session, inspect_onnx, lambda p: quantize_int8(p, tmp_path / "int8.onnx")):
        with pytest.raises(OnnxFileError) as caught:
            reader(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.onnx"] if content is not None else [])


def test_error_line_is_the_first_line_or_the_type():
    assert error_line(ValueError("first\nsecond")) == "first"
    assert error_line(ValueError("\n  \nreal reason\nmore")) == "real reason"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(RuntimeError("")) == "RuntimeError"
    assert issubclass(OnnxFileError, BuilderError)
