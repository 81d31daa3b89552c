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


@pytest.mark.parametrize(
    "section, message",
    [
        ({"train": {"epochs": "many"}}, "train: epochs='many': Input should be a valid integer"),
        ({"prune": {"keep_ratio": "half"}}, "prune: keep_ratio='half': Input should be a valid number"),
        ({"publish": {"max_batch_size": [8]}}, "publish: max_batch_size=[8]: Input should be a valid integer"),
    ],
)
def test_a_setting_of_the_wrong_kind_is_named_in_one_line(section, message):
    from builder.errors import BuilderError

    with pytest.raises(BuilderError) as refused:
        BuildConfig.from_mapping(section)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_yaml_strings_for_numbers_are_taken_as_numbers():
    config = BuildConfig.from_mapping({"train": {"epochs": "3"}, "prune": {"keep_ratio": "0.5"}})
    assert config.train.epochs == 3 and config.prune.keep_ratio == 0.5


def test_publish_refuses_worse_models_with_the_same_budget_a_build_gives_its_stages():
    from builder.publish import DEFAULT_MAX_ACCURACY_DROP, PublishSettings

    assert PublishSettings().max_accuracy_drop == DEFAULT_MAX_ACCURACY_DROP == BuildConfig().max_accuracy_drop
