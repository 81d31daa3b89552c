"""The TensorRT engine stage's settings."""

import pytest

from builder.engine import EngineConfig, EngineError


def test_bad_batch_profile_is_refused():
    with pytest.raises(EngineError, match="min batch <= opt batch <= max batch"):
        EngineConfig(min_batch=8, opt_batch=4)
