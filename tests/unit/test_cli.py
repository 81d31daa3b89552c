"""The command line keeps no defaults of its own: a flag not given leaves the setting to its dataclass, and
`--help` shows the dataclass's default."""

import argparse
import dataclasses

import pytest

from builder.cli import _RECIPE_FIELDS, build_parser
from builder.engine import EngineConfig
from builder.prune import PruneConfig
from builder.publish import PublishSettings
from builder.qat import QATConfig
from builder.quantize import QuantizeConfig
from builder.train_config import TrainConfig

# (command, flag, settings dataclass, field) for every flag that sets a dataclass field.
DATACLASS_FLAGS = [
    *[
        ("prune", flag, PruneConfig, field)
        for flag, field in (
            ("--target", "target"),
            ("--keep-ratio", "keep_ratio"),
            ("--importance", "importance"),
            ("--scope", "scope"),
            ("--steps", "steps"),
            ("--finetune-epochs", "finetune_epochs"),
            ("--round-to", "round_to"),
        )
    ],
    *[
        ("quantize", flag, QuantizeConfig, field)
        for flag, field in (
            ("--target", "target"),
            ("--calibration-images", "calibration_images"),
            ("--calibration-method", "method"),
            ("--full-range-weights", "reduce_range"),
        )
    ],
    ("quantize", "--qat-epochs", QATConfig, "epochs"),
    ("quantize", "--qat-lr", QATConfig, "lr"),
    *[
        ("engine", flag, EngineConfig, field)
        for flag, field in (
            ("--precision", "precision"),
            ("--min-batch", "min_batch"),
            ("--opt-batch", "opt_batch"),
            ("--max-batch", "max_batch"),
        )
    ],
    *[
        ("publish", flag, PublishSettings, field)
        for flag, field in (
            ("--max-batch-size", "max_batch_size"),
            ("--instances", "instance_count"),
            ("--intra-op-threads", "intra_op_threads"),
            ("--max-queue-delay-us", "max_queue_delay_us"),
            ("--max-queue-size", "max_queue_size"),
            ("--intra-op-spinning", "intra_op_spinning"),
            ("--no-dynamic-batching", "dynamic_batching"),
            ("--target", "target"),
            ("--pixel-input", "pixel_input"),
            ("--keep", "keep"),
            ("--version-policy", "version_policy"),
            ("--latest-versions", "latest_versions"),
            ("--triton-url", "triton_url"),
            ("--trt-cache-path", "trt_cache_path"),
            ("--no-cuda-graphs", "cuda_graphs"),
            ("--compute-capability", "compute_capability"),
            ("--preferred-batch-sizes", "preferred_batch_sizes"),
        )
    ],
    *[
        (command, "--" + field.name.replace("_", "-"), TrainConfig, field.name)
        for command in ("train", "tune")
        for field in dataclasses.fields(TrainConfig)
        if field.name != "out_dir" and (command == "train" or field.name not in ("resume", "tensorboard"))
    ],
]
# Options of the command line itself, whose defaults belong to no settings dataclass.
CLI_DEFAULTS = {
    ("tune", "out"),
    ("tune", "trials"),
    ("tune", "sampler"),
    ("export", "parity_images"),
    ("publish", "repository"),
    ("rollout", "repository"),
    ("degrade", "repository"),
    ("rollout", "gateway_url"),
    ("evaluate", "out"),
    ("quantize", "method"),
    ("quantize", "precision"),
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _action(command: str, flag: str) -> argparse.Action:
    return next(a for a in _commands()[command]._actions if flag in a.option_strings)


def _help_of(command: str, flag: str) -> str:
    parser = _commands()[command]
    formatter = parser._get_formatter()
    formatter.add_argument(_action(command, flag))
    return " ".join(formatter.format_help().split())


def _field_default(config_type, name):
    field = next(f for f in dataclasses.fields(config_type) if f.name == name)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def test_no_flag_hard_codes_a_default():
    hard_coded = [
        f"{command} {action.option_strings[0]}={action.default!r}"
        for command, parser in _commands().items()
        for action in parser._actions
        if action.option_strings
        and action.default not in (None, False, argparse.SUPPRESS)
        and action.dest != "help"
        and (command, action.dest) not in CLI_DEFAULTS
    ]
    assert hard_coded == []


@pytest.mark.parametrize(
    "command, flag, config_type, name", DATACLASS_FLAGS, ids=[f"{c}{f}" for c, f, _, _ in DATACLASS_FLAGS]
)
def test_a_flag_not_given_leaves_the_dataclass_default_and_help_shows_it(command, flag, config_type, name):
    action = _action(command, flag)
    assert action.default in (None, argparse.SUPPRESS) or (action.nargs == 0 and action.default is False)
    default = _field_default(config_type, name)
    if action.nargs != 0 and default is not None:
        assert f"(default: {default})" in _help_of(command, flag)


def test_help_follows_a_changed_dataclass_default(monkeypatch):
    field = next(f for f in dataclasses.fields(PruneConfig) if f.name == "keep_ratio")
    monkeypatch.setattr(field, "default", 0.3)
    assert "(default: 0.3)" in _help_of("prune", "--keep-ratio")


def test_every_training_setting_but_the_run_folder_is_a_flag():
    assert set(_RECIPE_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir"}
    flags = {a.dest for a in _commands()["train"]._actions}
    assert set(_RECIPE_FIELDS) <= flags


def test_a_model_without_a_spec_of_its_own_is_published_with_imagenets():
    from builder.train_config import IMAGENET_MEAN, IMAGENET_STD, serving_preprocess

    spec = serving_preprocess(None)
    assert (spec.image_size, spec.resize_size, spec.mean, spec.std) == (224, 256, IMAGENET_MEAN, IMAGENET_STD)
    assert serving_preprocess(None, crop=112).resize_size == 128
    carried = {"image_size": 32, "resize_size": 32, "mean": [0.5], "std": [0.2], "color_mode": "L"}
    assert serving_preprocess(carried) is None  # the model's own spec stands
    assert serving_preprocess(carried, resize=40).mean == (0.5,)


def test_an_unknown_flag_is_blamed_on_its_subcommand(capsys):
    from builder.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--epoch", "1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "builder train: error: unrecognized arguments: --epoch 1 (see `builder train --help`)"
    )
