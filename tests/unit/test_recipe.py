"""The training recipe's parts: schedules, losses, accumulation, resume, early stopping, init and freezing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from builder.errors import CheckpointError
from builder.losses import LossError, focal_loss, inverse_frequency_weights, resolve_class_weights
from builder.checkpoint import load_init_weights
from builder.models import classifier, create_model
from builder.schedules import create_scheduler
from builder.loop import train_one_epoch
from builder.train import train
from builder.train_config import TrainConfig, TrainError, load_params


def lrs(name, steps, **kwargs):
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = create_scheduler(optimizer, name, lr=1.0, **kwargs)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_per_optimizer_step():
    values = lrs("cosine", 10, epochs=5, steps_per_epoch=2, warmup_epochs=1)
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    values = lrs("step", 9, epochs=3, steps_per_epoch=3, warmup_epochs=0, step_size=2, gamma=0.5)
    assert values == pytest.approx([1.0] * 6 + [0.5] * 3)


def test_onecycle_schedule_rises_to_lr_then_anneals_far_below_the_start():
    values = lrs("onecycle", 10, epochs=5, steps_per_epoch=2, warmup_epochs=1)
    assert values[0] == pytest.approx(1.0 / 25)  # torch's div_factor
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 1
    assert values[-1] == pytest.approx(1.0 / 25 / 1e4)


def test_auto_class_weights_are_inverse_frequencies_with_mean_one():
    weights = inverse_frequency_weights([10, 20, 40])
    assert weights.tolist() == pytest.approx([4 / 7 * 3, 2 / 7 * 3, 1 / 7 * 3])
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.equal(resolve_class_weights("auto", [10, 20, 40]), weights)


def test_explicit_class_weights_are_used_and_their_count_is_checked():
    assert resolve_class_weights("1,2.5,3", [5, 5, 5]).tolist() == [1.0, 2.5, 3.0]
    assert resolve_class_weights("none", [5, 5]) is None
    with pytest.raises(LossError, match="2 value.*3 classes"):
        resolve_class_weights("1,2", [5, 5, 5])
    with pytest.raises(LossError, match="positive"):
        resolve_class_weights("1,0,2", [5, 5, 5])


@pytest.mark.parametrize("soft", [False, True])
def test_focal_loss_with_gamma_zero_is_cross_entropy(soft):
    torch.manual_seed(0)
    logits = torch.randn(16, 5)
    target = torch.softmax(torch.randn(16, 5), dim=1) if soft else torch.randint(0, 5, (16,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0])
    for kwargs in ({}, {"weight": weight}, {"label_smoothing": 0.1}, {"weight": weight, "label_smoothing": 0.1}):
        expected = F.cross_entropy(logits, target, **kwargs)
        assert focal_loss(logits, target, gamma=0.0, **kwargs) == pytest.approx(expected.item(), rel=1e-5), kwargs


def test_focal_loss_down_weights_easy_examples_more_than_hard_ones():
    easy, hard = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.3]])
    label = torch.tensor([0])

    def ratio(logits):
        return (focal_loss(logits, label, gamma=2.0) / F.cross_entropy(logits, label)).item()

    assert ratio(easy) < 0.01 < 0.2 < ratio(hard) < 1.0


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


def small_config(tmp_path, name, **kwargs):
    settings = dict(dataset="digits", image_size=8, epochs=2, batch_size=32, out_dir=tmp_path / name)
    return TrainConfig(**{**settings, **kwargs})


class Interrupted(Exception):
    pass


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
    result = train(small_config(tmp_path, "patient", epochs=6, patience=2, lr=1e-12, freeze_backbone=True),
                   small_digits)
    assert result.stopped_early
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert len(json.loads((tmp_path / "patient" / "metrics.json").read_text())) == 3


def test_frozen_backbone_keeps_the_initial_weights_and_trains_the_classifier(tmp_path, small_digits):
    first = train(small_config(tmp_path, "first", epochs=1), small_digits)
    second = train(small_config(tmp_path, "second", epochs=1, init=str(first.best_checkpoint), freeze_backbone=True,
                                lr=0.05), small_digits)
    before = torch.load(first.best_checkpoint, weights_only=True)["model"]
    after = torch.load(second.best_checkpoint, weights_only=True)
    assert after["meta"]["recipe"]["init"]["loaded"] == len(before)
    for name, tensor in before.items():
        if name.startswith("fc."):
            assert not torch.equal(tensor, after["model"][name]), name
        else:
            assert torch.equal(tensor, after["model"][name]), name


def test_init_skips_the_classifier_when_the_class_count_differs(tmp_path):
    source = create_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "ten.pt"
    torch.save({"model": source.state_dict(), "meta": {"arch": "resnet18"}}, path)
    target = create_model("resnet18", num_classes=4, in_channels=1, image_size=8, dropout=0.3)
    report = load_init_weights(target, path)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert classifier(target).out_features == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        load_init_weights(target, tmp_path / "missing.pt")


def test_a_run_writes_metrics_curves_datacheck_and_a_loadable_checkpoint(tmp_path, small_digits):
    from builder.checkpoint import load_model

    result = train(small_config(tmp_path, "run", epochs=1, loss="focal", class_weights="auto", mixup=0.2,
                                schedule="onecycle", optimizer="sgd", accum_steps=2, clip_grad=1.0, dropout=0.2),
                   small_digits)
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
    result = train(small_config(tmp_path, "drw", epochs=3, class_weights="auto", class_weights_start=3),
                   small_digits)
    counts = [list(small_digits.train.labels).count(c) for c in range(10)]
    assert seen[0] is None and seen[1] is None
    assert torch.allclose(seen[2], inverse_frequency_weights(counts))
    assert result.epochs == 3
    with pytest.raises(TrainError, match="class_weights_start"):
        TrainConfig(class_weights_start=0)


def test_params_file_is_validated(tmp_path):
    good = tmp_path / "best.json"
    good.write_text(json.dumps({"params": {"lr": 0.01, "augment": "none"}}))
    assert load_params(good) == {"lr": 0.01, "augment": "none"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(TrainError, match="unknown setting.*learning_rate"):
        load_params(bad)
    with pytest.raises(TrainError, match="cannot be read"):
        load_params(tmp_path / "none.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"augment": "medium"}, "augment 'medium' is not one of none, light, strong"),
    ({"dropout": 1.5}, "dropout"),
    ({"accum_steps": 0}, "accum_steps"),
    ({"schedule": "linear"}, "schedule"),
])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)
