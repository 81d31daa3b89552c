"""Learning-rate schedules: their values per optimizer step."""

import math

import pytest
import torch
from torch import nn

from builder.schedules import create_scheduler, warmup_cosine


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    values = [warmup_cosine(step, warmup_steps=4, total_steps=14) for step in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0
    assert values[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert warmup_cosine(14, warmup_steps=4, total_steps=14) == pytest.approx(0.0)


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
