"""`builder evaluate --gateway-decode`: top-1 with the gateway's exact and reduced-scale JPEG decoding, recorded
in the ONNX file, and written by `builder publish` into the model's config for the gateway to follow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder import model_config
from builder.cli import main
from builder.data import load_dataset
from builder.onnx_meta import read_metadata
from server.preprocess import REDUCED_SCALE_PARAMETER


@pytest.fixture(scope="module")
def digit_jpegs(tmp_path_factory) -> Path:
    """Two validation digits per class (and one for training) as JPEG files of 96 to 200 pixels: large
    enough for libjpeg to decode them at 1/8 scale for the 8-pixel model."""
    root = tmp_path_factory.mktemp("digit-jpegs")
    digits = load_dataset("digits")
    rng = np.random.default_rng(0)
    counts = {"train": 1, "val": 2}
    for split_name, split in (("train", digits.train), ("val", digits.val)):
        seen: dict[int, int] = {}
        for image, label in zip(split.images, split.labels):
            if seen.get(label, 0) >= counts[split_name]:
                continue
            seen[label] = seen.get(label, 0) + 1
            side = int(rng.integers(96, 200))
            folder = root / split_name / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(
                folder / f"{seen[label]}.jpg", "JPEG", quality=90
            )
    return root


def _published_parameters(repository: Path, name: str) -> dict[str, str]:
    return model_config.parse((repository / name / "config.pbtxt").read_text()).parameters


def test_evaluate_reports_both_decodes_and_publish_writes_whether_reduced_scale_is_allowed(
    tiny_run, digit_jpegs, tmp_path, capsys
):
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_run / "model.onnx", model)
    common = ["evaluate", "--onnx", str(model), "--dataset", str(digit_jpegs), "--gateway-decode"]
    assert main([*common, "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    decode = json.loads(captured.out)["gateway_decode"]
    assert decode["applies"] and decode["images"] == decode["jpeg_images"] == 20
    assert 0 <= decode["exact_top1"] <= 1 and 0 <= decode["reduced_top1"] <= 1
    assert decode["reduced_scale"] == (100 * (decode["exact_top1"] - decode["reduced_top1"]) <= 1.0)
    assert "gateway decode: top-1" in captured.err and "at reduced scale" in captured.err
    recorded = json.loads(read_metadata(model)["decode"])
    assert recorded == {key: value for key, value in decode.items() if key not in ("applies", "recorded_in")}

    repository = tmp_path / "repo"
    assert main(["publish", "--onnx", str(model), "--repository", str(repository), "--name", "measured"]) == 0
    parameters = _published_parameters(repository, "measured")
    assert parameters[REDUCED_SCALE_PARAMETER] == ("true" if decode["reduced_scale"] else "false")
    assert float(parameters["decode.exact_top1"]) == pytest.approx(decode["exact_top1"], abs=1e-4)
    assert float(parameters["decode.reduced_top1"]) == pytest.approx(decode["reduced_top1"], abs=1e-4)


def test_in_memory_validation_images_record_nothing_that_allows_reduced_scale(tiny_run, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_run / "model.onnx", model)
    assert main(["evaluate", "--onnx", str(model), "--gateway-decode", "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gateway_decode"] == {
        "applies": False,
        "reason": "reduced-scale decoding does not apply: the validation images are in-memory arrays, not JPEG files",
    }
    assert captured.err.count("reduced-scale decoding does not apply") == 1
    assert "decode" not in read_metadata(model)
    repository = tmp_path / "repo"
    assert main(["publish", "--onnx", str(model), "--repository", str(repository), "--name", "digits"]) == 0
    assert not any(key.startswith("decode.") for key in _published_parameters(repository, "digits"))


def test_gateway_decode_needs_an_onnx_model(tiny_run, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tiny_run / "best.pt"), "--gateway-decode"]) == 2
    assert "--gateway-decode scores an ONNX model" in capsys.readouterr().err


def test_a_build_measures_both_decodes_of_what_it_publishes_and_publishes_the_decision(tiny_run, digit_jpegs, tmp_path):
    settings = {
        "name": "jpegs",
        "out_dir": str(tmp_path / "build"),
        "onnx": str(tiny_run / "model.onnx"),
        "dataset": str(digit_jpegs),
        "prune": False,
        "quantize": False,
        "publish": {"repository": str(tmp_path / "repo")},
        "benchmark_seconds": 0.05,
    }
    (tmp_path / "build.yaml").write_text(json.dumps(settings))
    assert main(["build", "--config", str(tmp_path / "build.yaml")]) == 0
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    decode = report["gateway_decode"]
    assert decode["applies"] and decode["model"] == "fp32.onnx" and decode["jpeg_images"] == 20
    assert decode["max_accuracy_drop"] == report["max_accuracy_drop_points"] == 1.0
    assert "Gateway decode: `fp32.onnx` top-1" in (tmp_path / "build" / "report.md").read_text()
    parameters = _published_parameters(tmp_path / "repo", "jpegs")
    assert parameters[REDUCED_SCALE_PARAMETER] == ("true" if decode["reduced_scale"] else "false")
    assert float(parameters["decode.reduced_top1"]) == pytest.approx(decode["reduced_top1"], abs=1e-4)
