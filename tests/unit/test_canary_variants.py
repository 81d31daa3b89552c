"""The canaries python -m loadtests.canary publishes (one answering another class than its source for every
input, one answering exactly as its source with more work) and what makes the run fail."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from loadtests.canary import Outcome, main, violations, with_classes_rolled, with_extra_work
from tests.onnx_variants import conv_classifier


def _logits(path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_the_wrong_canary_never_agrees_and_the_slow_one_always_does(tmp_path) -> None:
    source = conv_classifier(tmp_path / "source.onnx")
    model = onnx.load(str(source))  # two classes with other weights: no ties between them
    weights = np.random.default_rng(1).standard_normal((2, 1, 4, 4)).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "weight"))
    onnx.save(model, str(source))
    batch = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    expected = _logits(source, batch)
    rolled = _logits(with_classes_rolled(source, tmp_path / "wrong.onnx"), batch)
    assert rolled.shape == expected.shape
    assert (rolled.argmax(axis=1) == (expected.argmax(axis=1) + 1) % expected.shape[1]).all()
    slow = _logits(with_extra_work(source, tmp_path / "slow.onnx", width=16, layers=2), batch)
    np.testing.assert_array_equal(slow, expected)


def test_the_canary_run_fails_on_a_failed_request_or_a_bad_canary_left_serving(capsys) -> None:
    halted = Outcome("wrong", 2, requests=500, halted="agreement")
    assert violations([halted, Outcome("share", 3, requests=2000)]) == []
    assert violations([Outcome("slow", 2, requests=900)]) == ["slow: canary version 2 was not halted"]
    failed = Outcome("wrong", 2, requests=500, failed=1, statuses=Counter({502: 1}), halted="agreement")
    assert violations([failed]) == ["wrong: 1 requests failed: {502: 1}"]
    # Bad options: one line, exit 2, nothing started.
    assert main(["--clients", "9"]) == 2 and main(["--scenarios", "wrong,fast"]) == 2
    assert [len(capsys.readouterr().err.strip().splitlines())] == [2]
