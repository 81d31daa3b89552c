"""Progress within an epoch: a live bar on a terminal, plain log lines now and then elsewhere, quiet in tests."""

import io
import logging

from rich.console import Console

from builder import progress
from builder.train import train
from builder.train_config import TrainConfig


def quick_config(tmp_path):
    # 200 training images in batches of 64: four steps in the epoch.
    return TrainConfig(dataset="digits", epochs=1, image_size=8, batch_size=64, out_dir=tmp_path)


def test_on_a_terminal_the_bar_counts_images_within_the_epoch(tmp_path, small_digits, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=True, width=120))
    train(quick_config(tmp_path), small_digits)
    text = screen.getvalue()
    for done in ("64/200", "128/200", "192/200", "200/200"):  # after each step, not only at the end
        assert done in text, text[-500:]
    assert "80/80" in text  # the validation pass too


def test_in_a_log_plain_lines_report_progress_within_a_long_epoch(tmp_path, small_digits, monkeypatch, caplog):
    # Not a terminal: no bar, no control codes; a plain line at most every PLAIN_INTERVAL_S (here: always).
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen), raising=False)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0, raising=False)
    with caplog.at_level(logging.INFO, logger="builder.progress"):
        train(quick_config(tmp_path), small_digits)
    lines = [r.getMessage() for r in caplog.records if r.name == "builder.progress"]
    assert any(line.startswith("epoch 1/1: 64/200 images") for line in lines), lines
    assert "\x1b[" not in screen.getvalue() and "\x1b[" not in "".join(lines)


def test_in_a_log_progress_is_quiet_no_bar_and_at_most_a_line_per_interval(tmp_path, small_digits, caplog, capsys):
    import time

    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        train(quick_config(tmp_path), small_digits)
    elapsed = time.monotonic() - started
    lines = [r for r in caplog.records if r.name == "builder.progress"]
    assert len(lines) <= elapsed / progress.PLAIN_INTERVAL_S + 1, [r.getMessage() for r in lines]
    err = capsys.readouterr().err
    assert "/200" not in err and "\x1b[" not in err
