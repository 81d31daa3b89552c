"""`builder train` on small datasets in process: every architecture learns a plainly separable dataset, a
run at chance says so, and the recipe's parts (accumulation, resume, early stopping, class weights,
freezing), checkpoints, progress and the data check behave over real epochs."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from builder import progress
from builder.checkpoint import load_model
from builder.data import ImageDataset, Split, load_dataset
from builder.loop import train_one_epoch
from builder.losses import inverse_frequency_weights
from builder.train import train
from builder.train_config import ARCHITECTURES, TrainConfig, TrainError

COLORS = ((230, 40, 40), (40, 230, 40), (40, 40, 230))


def _separable(per_class: int, seed: int, size: int = 8) -> Split:
    """Noisy images tinted with the class's color: the channel means alone tell the classes apart."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, color in enumerate(COLORS):
        for _ in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            images.append(Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)))
            labels.append(label)
    return Split(images, labels)


def separable_dataset() -> ImageDataset:
    return ImageDataset(
        name="separable",
        classes=["red", "green", "blue"],
        color_mode="RGB",
        default_image_size=8,
        train=_separable(8, seed=0),
        val=_separable(4, seed=1),
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_learns_a_separable_dataset(tmp_path, arch):
    # Three optimizer steps per epoch, 18 in all: a short run, where BatchNorm's running statistics lag most.
    result = train(
        TrainConfig(
            dataset="separable", arch=arch, epochs=6, batch_size=8, warmup_epochs=0, augment="none", out_dir=tmp_path
        ),
        separable_dataset(),
    )
    accuracies = [round(h["val_accuracy"], 3) for h in result.history]
    # Chance is 1/3; the colors alone separate the classes.
    assert result.val_accuracy >= 0.9, f"{arch}: validation accuracy per epoch {accuracies}"


def test_a_run_stuck_at_chance_on_validation_ends_with_a_warning(tmp_path, capsys):

    # Validation images all look like the first class but carry every label: nothing scores above 1/3 there.
    dataset = separable_dataset()
    red = _separable(6, seed=2).images[:6]
    dataset.val = Split(red + red + red, [0] * 6 + [1] * 6 + [2] * 6)
    result = train(
        TrainConfig(dataset="separable", epochs=3, batch_size=8, warmup_epochs=0, augment="none", out_dir=tmp_path),
        dataset,
    )
    assert max(h["train_accuracy"] for h in result.history) >= 0.9
    (warning,) = result.warnings
    assert "validation accuracy stayed at chance" in warning and "chance 0.333 on 18 images" in warning
    assert "WARNING: validation accuracy stayed at chance" in capsys.readouterr().err


@pytest.mark.parametrize(
    "val, train, warned",
    [
        ([0.10, 0.11, 0.10], [0.40, 0.80, 0.95], True),  # ten balanced classes: chance 0.1
        ([0.10, 0.45, 0.80], [0.40, 0.80, 0.95], False),  # it generalizes
        ([0.10, 0.10, 0.11], [0.10, 0.12, 0.15], False),  # it learned nothing at all: a different problem
    ],
)
def test_the_chance_warning_needs_training_to_climb_while_validation_stays(val, train, warned):
    from builder.train import chance_warning

    history = [{"epoch": i + 1, "val_accuracy": v, "train_accuracy": t} for i, (v, t) in enumerate(zip(val, train))]
    labels = [i % 10 for i in range(1000)]
    assert (chance_warning(history, labels) is not None) is warned


def test_training_writes_checkpoints_metrics_and_learns(tiny_run):
    history = json.loads((tiny_run / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in history) > 0.5  # ten classes: chance is 0.1
    assert (tiny_run / "last.pt").is_file() and (tiny_run / "config.json").is_file()


def test_checkpoint_reloads_into_the_same_model(tiny_run):
    model, meta = load_model(tiny_run / "best.pt")
    assert meta.arch == "resnet18" and meta.classes == tuple(str(i) for i in range(10))
    assert meta.val_accuracy == max(h["val_accuracy"] for h in json.loads((tiny_run / "metrics.json").read_text()))
    # The weights and BatchNorm statistics came back: the validation split scores what training recorded.
    from builder.evaluate import evaluate, validation_data

    assert evaluate(model.eval(), validation_data(meta)).top1 == pytest.approx(meta.val_accuracy)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-weights", "1,2"], "--class-weights has 2 value(s) but the dataset has 10 classes"),
        (["--init", "missing.pt"], "--init checkpoint missing.pt does not exist"),
        (["--params", "missing.json"], "params file missing.json cannot be read"),
        (["--dataset", "shapes:sides=3"], "unknown option 'sides'"),
        (["--dataset", "digits", "--shapes-imbalance", "3"], "--shapes-* options apply to --dataset shapes"),
        (["--mean", "0.5", "0.5"], "--mean needs 1 value(s)"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    ],
)
def test_bad_training_settings_are_one_line_errors(capsys, tmp_path, args, message):
    from builder.cli import main

    assert main(["train", "--image-size", "8", "--epochs", "1", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("builder train: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_an_unreadable_file_is_warned_about_once_per_process(tmp_path, caplog):
    """Loading the folder again (build reloads it after training) and training on it twice (tune trials)
    repeat no warning about the same file."""
    from builder.train import train
    from builder.train_config import TrainConfig

    broken = _folder_with_a_broken_image(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(str(tmp_path / "data"))
        load_dataset(str(tmp_path / "data"))
        for trial in range(2):
            train(
                TrainConfig(dataset=str(tmp_path / "data"), epochs=1, image_size=8, out_dir=tmp_path / f"t{trial}"),
                dataset,
            )
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "broken.png" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert json.loads((tmp_path / "t1" / "datacheck.json").read_text())["unreadable"] == [str(broken)]


def test_gradient_accumulation_equals_one_larger_batch():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))

    def run(batch_size, accum_steps):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no momentum: the update is the gradient
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
        train_one_epoch(model, loader, optimizer, scheduler, nn.CrossEntropyLoss(), accum_steps=accum_steps)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), scheduler.last_epoch

    accumulated, accumulated_steps = run(batch_size=4, accum_steps=2)
    large, large_steps = run(batch_size=8, accum_steps=1)
    single, _ = run(batch_size=4, accum_steps=1)
    assert accumulated_steps == large_steps == 2  # the scheduler counts optimizer steps
    torch.testing.assert_close(accumulated, large, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(single, large, atol=1e-4)


def test_resume_continues_the_same_curve(tmp_path, small_digits):
    straight = train(small_config(tmp_path, "straight", augment="strong"), small_digits)

    def stop_after_first_epoch(record):
        raise Interrupted(record["epoch"])

    with pytest.raises(Interrupted):
        train(small_config(tmp_path, "resumed", augment="strong"), small_digits, on_epoch=stop_after_first_epoch)
    assert len(json.loads((tmp_path / "resumed" / "metrics.json").read_text())) == 1
    resumed = train(small_config(tmp_path, "resumed", augment="strong", resume=True), small_digits)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(straight.history, resumed.history):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_resume_without_a_previous_run_is_a_builder_error(tmp_path, small_digits):
    with pytest.raises(TrainError, match="nothing to resume"):
        train(small_config(tmp_path, "fresh", resume=True), small_digits)


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(tmp_path, small_digits):
    # A frozen backbone and a vanishing learning rate: val accuracy cannot improve after epoch 1.
    result = train(
        small_config(tmp_path, "patient", epochs=6, patience=2, lr=1e-12, freeze_backbone=True), small_digits
    )
    assert result.stopped_early
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert len(json.loads((tmp_path / "patient" / "metrics.json").read_text())) == 3


def test_frozen_backbone_keeps_the_initial_weights_and_trains_the_classifier(tmp_path, small_digits):
    first = train(small_config(tmp_path, "first", epochs=1), small_digits)
    second = train(
        small_config(tmp_path, "second", epochs=1, init=str(first.best_checkpoint), freeze_backbone=True, lr=0.05),
        small_digits,
    )
    before = torch.load(first.best_checkpoint, weights_only=True)["model"]
    after = torch.load(second.best_checkpoint, weights_only=True)
    assert after["meta"]["recipe"]["init"]["loaded"] == len(before)
    for name, tensor in before.items():
        if name.startswith("fc."):
            assert not torch.equal(tensor, after["model"][name]), name
        else:
            assert torch.equal(tensor, after["model"][name]), name


def test_a_run_writes_metrics_curves_datacheck_and_a_loadable_checkpoint(tmp_path, small_digits):
    from builder.checkpoint import load_model

    result = train(
        small_config(
            tmp_path,
            "run",
            epochs=1,
            loss="focal",
            class_weights="auto",
            mixup=0.2,
            schedule="onecycle",
            optimizer="sgd",
            accum_steps=2,
            clip_grad=1.0,
            dropout=0.2,
        ),
        small_digits,
    )
    run = tmp_path / "run"
    history = json.loads((run / "metrics.json").read_text())
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "datacheck.json").read_text())["train_counts"]
    config = json.loads((run / "config.json").read_text())
    assert (config["loss"], config["mixup"], config["accum_steps"], config["dropout"]) == ("focal", 0.2, 2, 0.2)
    model, meta = load_model(result.best_checkpoint)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10) and meta.recipe["class_weights"]


def test_deferred_class_weights_apply_from_their_start_epoch_only(tmp_path, small_digits, monkeypatch):
    import builder.train as train_module

    seen = []
    original = train_module.train_one_epoch

    def recording(model, loader, optimizer, scheduler, criterion, **kwargs):
        seen.append(None if criterion.weight is None else criterion.weight.clone())
        return original(model, loader, optimizer, scheduler, criterion, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", recording)
    result = train(small_config(tmp_path, "drw", epochs=3, class_weights="auto", class_weights_start=3), small_digits)
    counts = [list(small_digits.train.labels).count(c) for c in range(10)]
    assert seen[0] is None and seen[1] is None
    assert torch.allclose(seen[2], inverse_frequency_weights(counts))
    assert result.epochs == 3
    with pytest.raises(TrainError, match="class_weights_start"):
        TrainConfig(class_weights_start=0)


def small_config(tmp_path, name, **kwargs):
    settings = dict(dataset="digits", image_size=8, epochs=2, batch_size=32, out_dir=tmp_path / name)
    return TrainConfig(**{**settings, **kwargs})


class Interrupted(Exception):
    pass


def _folder_with_a_broken_image(root):
    shapes = load_dataset("shapes:per_class=8,size=16")
    for index, (image, label) in enumerate(zip(shapes.train.images, shapes.train.labels)):
        folder = root / shapes.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    (root / shapes.classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root / shapes.classes[0] / "broken.png"


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
