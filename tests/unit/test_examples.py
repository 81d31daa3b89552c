"""The example build files stay valid as the settings they name evolve."""

from pathlib import Path

import pytest

from builder.build import BuildConfig, _section
from builder.prune import PruneConfig
from builder.publish import PublishSettings
from builder.quantize import QuantizeConfig
from builder.train_config import TrainConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_build_file_names_only_known_settings(path):
    config = BuildConfig.from_yaml(path)
    _section(TrainConfig, config.train, "train")
    _section(PruneConfig, config.prune or {}, "prune")
    _section(QuantizeConfig, config.quantize or {}, "quantize")
    publish = dict(config.publish or {})
    publish.pop("repository", None)
    _section(PublishSettings, publish, "publish")


def test_there_is_an_example():
    assert EXAMPLES
