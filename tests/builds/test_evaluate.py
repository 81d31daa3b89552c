import json
import types

import numpy as np
import pytest

from builder.checkpoint import load_model
from builder.evaluate import (
    confusion_matrix,
    evaluate,
    measure_speed,
    per_class_scores,
    validation_data,
    write_evaluation,
)


@pytest.fixture(scope="module")
def trained(tiny_run):
    model, meta = load_model(tiny_run / "best.pt")
    return model, meta, validation_data(meta)


def test_torch_model_and_its_onnx_export_score_the_same_on_every_validation_image(trained, tiny_run, tmp_path):
    model, meta, data = trained
    from_torch = evaluate(model, data)
    from_onnx = evaluate(tiny_run / "model.onnx", data, confusion_png=tmp_path / "confusion.png")
    assert from_torch.images == from_onnx.images == len(data) == 360
    np.testing.assert_array_equal(from_torch.predictions, from_onnx.predictions)
    assert from_torch.top1 == from_onnx.top1 == pytest.approx(meta.val_accuracy)
    assert from_onnx.confusion.sum() == 360 and np.trace(from_onnx.confusion) == round(360 * from_onnx.top1)
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_precision_and_recall_come_from_the_confusion_matrix_columns_and_rows():
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 1])
    confusion = confusion_matrix(truth, predicted, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    a, b, c = per_class_scores(confusion, ["a", "b", "c"])
    assert (a.precision, a.recall, a.support) == (1.0, pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall) == (0.5, 1.0)
    assert (c.precision, c.recall) == (0.0, 0.0)  # never predicted: 0, not NaN


def test_evaluation_is_written_as_json_with_per_class_scores(trained, tmp_path):
    model, _, data = trained
    path = write_evaluation(evaluate(model, data), tmp_path / "evaluation.json")
    written = json.loads(path.read_text())
    assert [c["label"] for c in written["per_class"]] == [str(i) for i in range(10)]
    assert sum(c["support"] for c in written["per_class"]) == written["images"] == 360


def test_speed_is_the_median_time_at_batch_1_and_batch_8(tiny_run, monkeypatch):
    import builder.evaluate as evaluate_module

    # A clock that only the session moves, and a session whose calls take a known time: exact figures.
    seconds_per_call = {1: 0.004, 8: 0.016}
    clock = types.SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    batches = []
    real_session = evaluate_module.onnx_session

    class TimedSession:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, outputs, feed):
            (batch,) = feed.values()
            batches.append(batch.shape)
            clock.now += seconds_per_call[batch.shape[0]]
            return self.session.run(outputs, feed)

    monkeypatch.setattr(evaluate_module, "time", clock)
    monkeypatch.setattr(evaluate_module, "onnx_session", lambda *a, **k: TimedSession(real_session(*a, **k)))
    speed = measure_speed(tiny_run / "model.onnx", min_seconds=0.1, min_runs=5, warmup=1)
    assert set(batches) == {(1, 1, 8, 8), (8, 1, 8, 8)}
    assert speed.latency_b1_ms == pytest.approx(4.0)
    assert speed.throughput_b8 == pytest.approx(8 / 0.016)


def test_evaluate_subcommand_scores_an_onnx_file_and_times_it(tiny_run, tmp_path, capsys):
    from builder.cli import main

    assert main(["evaluate", "--onnx", str(tiny_run / "model.onnx"), "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 360 and summary["throughput_b8"] > 0
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "evaluation.json").is_file()


def test_evaluate_subcommand_refuses_a_file_that_is_not_onnx_in_one_line(tmp_path, capsys):
    from builder.cli import main

    (tmp_path / "x.onnx").write_text("not a model")
    assert main(["evaluate", "--onnx", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
