"""The unit tier's rule, enforced by tests/unit/conftest.py: a test here that trains or starts a process fails."""

import subprocess
import sys

import pytest
import torch

import builder.train
from builder.train_config import TrainConfig
from tests.unit.conftest import RULE, UnitTierViolation


def test_training_is_refused(tmp_path):
    with pytest.raises(UnitTierViolation, match=RULE):
        builder.train.train(TrainConfig(dataset="digits", epochs=1, image_size=8, out_dir=tmp_path))


def test_a_backward_pass_is_refused():
    weight = torch.ones(2, requires_grad=True)
    with pytest.raises(UnitTierViolation, match=RULE):
        (weight * 3).sum().backward()


def test_starting_a_process_is_refused():
    with pytest.raises(UnitTierViolation, match=RULE):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.spawns
def test_a_test_marked_spawns_may_start_a_small_python_child():
    assert (
        subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True, check=True).stdout
        == "child\n"
    )
