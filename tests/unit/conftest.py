"""The unit tier's rule: no training and no processes, so the whole tier runs in seconds. Training (a
backward pass, or builder.train.train) and starting a process raise here; a test that must spawn a small
Python child says so with @pytest.mark.spawns."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import builder.train

RULE = "unit tests neither train nor start processes"


class UnitTierViolation(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise UnitTierViolation(RULE)


class _RefusedPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        # ctypes.util.find_library asks ldconfig for a library's name; that is a lookup, not a server.
        if sys._getframe(1).f_globals.get("__name__") == "ctypes.util":
            super().__init__(*args, **kwargs)
            return
        raise UnitTierViolation(RULE)


@pytest.fixture(autouse=True)
def unit_tier_rule(request, monkeypatch):
    # Every optimizer step needs a backward pass first, so refusing it catches any training loop.
    monkeypatch.setattr(torch.autograd, "backward", _refuse)
    monkeypatch.setattr(builder.train, "train", _refuse)
    if request.node.get_closest_marker("spawns") is None:
        monkeypatch.setattr(subprocess, "Popen", _RefusedPopen)
