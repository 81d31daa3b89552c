"""`builder train --params best.json`: tune's recorded base settings apply, then its tuned parameters,
then the flags given; the command says where each setting came from."""

import json

import pytest

from builder.cli import _train_config, build_parser
from builder.train_config import TrainConfig, TrainError


@pytest.fixture
def best_json(tmp_path):
    """A best.json as `builder tune --dataset FOLDER --image-size 32 --arch mobilenet_v3_small --epochs 3` writes it."""
    folder = tmp_path / "photos"
    base = TrainConfig(
        dataset=str(folder),
        image_size=32,
        arch="mobilenet_v3_small",
        epochs=3,
        equalize=True,
        out_dir=tmp_path / "tune",
    )
    path = tmp_path / "tune" / "best.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "params": {
                    "lr": 0.0042,
                    "weight_decay": 0.001,
                    "batch_size": 32,
                    "augment": "none",
                    "label_smoothing": 0.05,
                },
                "val_accuracy": 0.9,
                "trial": 3,
                "study": "tune-tune",
                "base": base.to_dict(),
            }
        )
    )
    return path, folder


def _config(*argv):
    return _train_config(build_parser().parse_args(["train", *argv]))


def test_the_recorded_base_applies_without_flags(best_json, capsys):
    path, folder = best_json
    config = _config("--params", str(path))
    assert (config.dataset, config.image_size, config.arch, config.epochs, config.equalize) == (
        str(folder),
        32,
        "mobilenet_v3_small",
        3,
        True,
    )
    assert (config.lr, config.batch_size, config.augment, config.label_smoothing) == (0.0042, 32, "none", 0.05)
    # Where the tuning study kept its trials is no place for this run.
    assert config.out_dir == TrainConfig().out_dir and config.resume is False
    err = capsys.readouterr().err
    assert "best.json base: dataset=" in err and "image_size=32" in err and "arch=mobilenet_v3_small" in err
    assert "best.json params: lr=0.0042" in err


def test_explicit_flags_win_over_base_and_params(best_json, capsys):
    path, _ = best_json
    config = _config(
        "--params",
        str(path),
        "--dataset",
        "digits",
        "--image-size",
        "16",
        "--arch",
        "resnet18",
        "--lr",
        "0.1",
        "--out",
        "runs/final",
    )
    assert (config.dataset, config.image_size, config.arch, config.lr) == ("digits", 16, "resnet18", 0.1)
    assert (config.epochs, config.batch_size, config.equalize) == (3, 32, True)  # the rest as recorded
    assert str(config.out_dir) == "runs/final"
    lines = capsys.readouterr().err.splitlines()
    flags = next(line for line in lines if "flags:" in line)
    assert "dataset=digits" in flags and "image_size=16" in flags and "lr=0.1" in flags
    base = next(line for line in lines if "best.json base:" in line)
    assert "dataset=" not in base and "epochs=3" in base


def test_a_flat_params_file_is_one_layer_and_unknown_settings_are_refused(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"lr": 0.01, "image_size": 24}))
    config = _config("--params", str(flat))
    assert (config.lr, config.image_size) == (0.01, 24)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"params": {"lr": 0.01}, "base": {"dataset": "digits", "colour": "blue"}}))
    with pytest.raises(TrainError, match="unknown setting"):
        _config("--params", str(bad))
