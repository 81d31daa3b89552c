"""The training recipe's parts: schedules, losses, accumulation, resume, early stopping, init and freezing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from builder.errors import CheckpointError
from builder.losses import LossError, focal_loss, inverse_frequency_weights, resolve_class_weights
from builder.checkpoint import load_init_weights
from builder.models import classifier, create_model
from builder.schedules import create_scheduler
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
