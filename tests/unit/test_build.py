"""Build files: the examples stay valid as the settings they name evolve."""

from pathlib import Path

import pytest

from builder.build import BuildConfig
from builder.prune import PruneConfig
from builder.publish import PublishSettings
from builder.quantize import QuantizeConfig
from builder.train_config import TrainConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_build_file_names_only_known_settings(path):
    config = BuildConfig.from_yaml(path)  # typed and checked when read
    assert isinstance(config.train, TrainConfig)
    assert config.prune is None or isinstance(config.prune, PruneConfig)
    assert config.quantize is None or isinstance(config.quantize, QuantizeConfig)
    assert config.publish is None or isinstance(config.publish, PublishSettings)


def test_there_is_an_example():
    assert EXAMPLES
