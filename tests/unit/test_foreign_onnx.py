"""A classifier exported elsewhere (no metadata of ours) through quantize, evaluate and build: the
preprocessing flags publish takes, a labelled folder, and one-line refusals that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from builder.build import BuildConfig
from builder.cli import build_parser, main
from builder.onnx_meta import read_onnx_meta
from server.preprocess import PreprocessSpec
from tests.onnx_variants import conv_classifier

# conv_classifier takes N x 1 x 4 x 4: grayscale, 4 x 4.
FLAGS = ["--resize", "4", "--crop", "4", "--color-mode", "L", "--mean", "0.5", "--std", "0.25"]
SPEC = PreprocessSpec(image_size=4, resize_size=4, mean=(0.5,), std=(0.25,), color_mode="L")


def labelled_folder(root: Path, per_class: int = 6, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    return conv_classifier(tmp_path / "model.onnx")


@pytest.fixture
def folder(tmp_path) -> Path:
    return labelled_folder(tmp_path / "images")


def test_quantize_writes_the_flags_labels_and_folder_into_the_int8_model_as_export_would(model, folder, capsys):
    assert (
        main(["quantize", "--onnx", str(model), "--calibration-data", str(folder), "--calibration-images", "8", *FLAGS])
        == 0
    )
    output = Path(json.loads(capsys.readouterr().out)["onnx"])
    assert output == model.with_name("model-int8.onnx")
    meta = read_onnx_meta(output)
    assert meta.preprocess == SPEC
    assert meta.classes == ("cat", "dog")  # the class folders, output i for folder i
    assert meta.has_dataset and meta.dataset_recipe["source"] == str(folder)
    assert meta.props["precision"] == "int8"
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(output)).graph.node)


def test_quantize_reads_weights_stored_beside_the_model_as_torch_onnx_export_writes_them(
    model, folder, tmp_path, capsys
):
    beside = tmp_path / "beside" / "model.onnx"
    beside.parent.mkdir()
    onnx.save(
        onnx.load(str(model)), str(beside), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    assert (beside.parent / "model.onnx.data").exists()
    args = ["quantize", "--onnx", str(beside), "--calibration-data", str(folder), "--calibration-images", "8", *FLAGS]
    assert main(args) == 0, capsys.readouterr().err
    output = Path(json.loads(capsys.readouterr().out)["onnx"])
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(output)).graph.node)
    assert sorted(p.name for p in beside.parent.iterdir()) == ["model-int8.onnx", "model.onnx", "model.onnx.data"]


def test_quantize_takes_a_labels_file_over_the_folder_names(model, folder, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("tabby\nterrier\n")
    flags = ["--calibration-data", str(folder), "--calibration-images", "8", "--labels", str(labels), *FLAGS]
    assert main(["quantize", "--onnx", str(model), *flags]) == 0
    assert read_onnx_meta(Path(json.loads(capsys.readouterr().out)["onnx"])).classes == ("tabby", "terrier")


def test_evaluate_scores_a_model_exported_elsewhere_on_the_folders_validation_split(model, folder, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--onnx", str(model), "--dataset", str(folder), "--out", str(out), *FLAGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3  # 20% of 12 images, rounded up
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [c["label"] for c in evaluation["per_class"]] == ["cat", "dog"]


def test_evaluate_refuses_a_folder_with_other_classes_than_the_model_in_one_line(model, tmp_path, capsys):
    three = labelled_folder(tmp_path / "three", classes=("a", "b", "c"))
    assert main(["evaluate", "--onnx", str(model), "--dataset", str(three), "--out", str(tmp_path / "o"), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "the model gives 2 scores per image but the dataset has 3 classes" in err
    assert len(err.strip().splitlines()) == 1


def _empty_classes(tmp_path: Path) -> Path:
    for name in ("cat", "dog"):
        (tmp_path / "empty" / name).mkdir(parents=True)
    return tmp_path / "empty"


def _command(command: str, model: Path, data: Path, tmp_path: Path) -> list[str]:
    return {
        "quantize": ["quantize", "--onnx", str(model), "--calibration-data", str(data), "--calibration-images", "8"],
        "evaluate": ["evaluate", "--onnx", str(model), "--dataset", str(data), "--out", str(tmp_path / "evaluation")],
        "build": [
            "build",
            "--onnx",
            str(model),
            "--dataset",
            str(data),
            "--calibration-images",
            "8",
            "--out",
            str(tmp_path / "build"),
            "--repository",
            str(tmp_path / "repository"),
        ],
    }[command]


@pytest.mark.parametrize("command", ["quantize", "evaluate", "build"])
@pytest.mark.parametrize(
    "case, message",
    [
        ("no images", "class folder"),
        ("no preprocessing flags", "carries no preprocessing spec: give the preprocessing it was trained with"),
        ("flags against the input shape", "the preprocessing makes 3 x 8 x 8 inputs (RGB, crop 8) but"),
        ("labels against the outputs", "3 labels for"),
        ("two inputs", "takes 2 inputs (input, extra); an image classifier takes one"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(
    command, case, message, model, folder, tmp_path, capsys
):
    data, flags = folder, FLAGS
    if case == "no images":
        data = _empty_classes(tmp_path)
    elif case == "no preprocessing flags":
        flags = []
    elif case == "flags against the input shape":
        flags = ["--resize", "8", "--crop", "8"]
    elif case == "two inputs":
        proto = onnx.load(str(model))
        extra = onnx.ValueInfoProto()
        extra.CopyFrom(proto.graph.input[0])
        extra.name = "extra"
        proto.graph.input.append(extra)
        onnx.save(proto, str(model))
    else:
        (tmp_path / "labels.txt").write_text("a\nb\nc\n")
        flags = [*FLAGS, "--labels", str(tmp_path / "labels.txt")]
    before = sorted(tmp_path.rglob("*"))
    assert main([*_command(command, model, data, tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # no INT8 file, no build.yaml, no evaluation, no repository


def test_a_build_from_onnx_names_its_dataset_or_is_refused_before_writing(model, tmp_path, capsys):
    args = ["build", "--onnx", str(model), "--out", str(tmp_path / "build"), *FLAGS]
    assert main(args) == 2
    assert "names no dataset: give --dataset" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()


def test_a_build_refuses_more_calibration_images_than_the_folder_has_before_writing(model, folder, tmp_path, capsys):
    args = ["build", "--onnx", str(model), "--dataset", str(folder), "--out", str(tmp_path / "build"), *FLAGS]
    assert main(args) == 2  # 256 calibration images by default; the training split has 8
    assert "asked for 256 calibration images but the training split" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()


def test_publish_quantize_evaluate_and_build_share_one_group_of_interface_flags():
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def group(command: str) -> list[list[str]]:
        found = [g for g in commands[command]._action_groups if g.title == "a model exported elsewhere"]
        assert len(found) == 1, command
        return [action.option_strings for action in found[0]._group_actions]

    expected = [["--labels"], ["--resize"], ["--crop"], ["--mean"], ["--std"], ["--color-mode"]]
    assert all(group(command) == expected for command in ("publish", "quantize", "evaluate", "build"))


def test_a_build_from_onnx_reads_back_from_its_build_yaml(tmp_path):
    config = BuildConfig.from_mapping(
        {"onnx": "model.onnx", "dataset": "images", "preprocess": {"crop": 4, "mean": [0.5]}, "labels": "l.txt"}
    )
    data = config.to_dict()
    assert "train" not in data  # nothing is trained
    again = BuildConfig.from_mapping(data)
    assert (again.onnx, again.dataset, again.preprocess, again.labels) == (
        Path("model.onnx"),
        "images",
        {"crop": 4, "mean": [0.5]},
        Path("l.txt"),
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"onnx": "m.onnx", "checkpoint": "c.pt"}, "give --checkpoint or --onnx"),
        ({"onnx": "m.onnx", "preprocess": {"size": 4}}, "unknown preprocess settings size"),
        ({"preprocess": {"crop": 4}}, "are for a build from an ONNX model"),
    ],
)
def test_build_settings_for_an_onnx_start_are_checked(values, message):
    from builder.errors import BuilderError

    with pytest.raises(BuilderError, match=message):
        BuildConfig.from_mapping(values)


def test_macs_and_parameters_are_counted_on_the_graph(model, tmp_path):
    from builder.onnx_graph import onnx_macs_and_params

    # One Conv, weight 2 x 1 x 4 x 4, output 2 x 1 x 1 per image: 32 products, 32 weights.
    assert onnx_macs_and_params(onnx.load(str(model))) == (32, 32)


def test_fp16_of_a_model_exported_elsewhere_carries_the_flags(model, capsys):
    assert main(["quantize", "--precision", "fp16", "--onnx", str(model), *FLAGS]) == 0
    meta = read_onnx_meta(Path(json.loads(capsys.readouterr().out)["onnx"]))
    assert (meta.preprocess, meta.props["precision"]) == (SPEC, "fp16")


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "--method", "qat", "--checkpoint", "run/best.pt", "--crop", "4"],
        ["quantize", "--method", "qat", "--checkpoint", "run/best.pt", "--calibration-data", "images"],
        ["evaluate", "--checkpoint", "run/best.pt", "--labels", "labels.txt"],
    ],
)
def test_interface_flags_with_a_checkpoint_are_refused_in_one_line(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not from flags" in err or "are for a model exported elsewhere (--onnx)" in err
    assert len(err.strip().splitlines()) == 1


def test_the_confusion_matrix_of_many_classes_stays_a_bounded_picture(tmp_path):
    from builder.evaluate import plot_confusion

    # 100 classes asked for a 5,640-pixel square; ImageNet's 1000 for 54,000 (the build was killed for memory).
    path = plot_confusion(np.eye(100, dtype=np.int64), [f"n{i:03d}" for i in range(100)], tmp_path / "confusion.png")
    with Image.open(path) as image:
        assert max(image.size) <= 2400
