"""The data check that runs before training."""

import json

import pytest
from PIL import Image

from builder.data import load_dataset
from builder.datacheck import check_dataset
from builder.shapes import CLASSES


def test_data_check_finds_unreadable_blank_and_duplicate_images(tmp_path, caplog):
    shapes = load_dataset("shapes:per_class=6,size=16")
    for split in ("train", "val"):
        for label in ("circle", "square"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                shapes.train.images[(i * 2 + label.startswith("s")) + (6 if split == "val" else 0)].save(
                    folder / f"{i}.png"
                )
    shapes.train.images[0].save(tmp_path / "val" / "circle" / "copy.png")  # = train/circle/0.png
    Image.new("RGB", (16, 16), (40, 40, 40)).save(tmp_path / "train" / "square" / "blank.png")
    (tmp_path / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    dataset = load_dataset(str(tmp_path))
    assert "skipping 1 unreadable" in caplog.text
    assert len(dataset.train) == 7 and len(dataset.val) == 7
    report = check_dataset(dataset)
    assert report.unreadable == [str(tmp_path / "train" / "circle" / "broken.png")]
    assert report.blank == [str(tmp_path / "train" / "square" / "blank.png")]
    assert report.duplicates == [
        (str(tmp_path / "train" / "circle" / "0.png"), str(tmp_path / "val" / "circle" / "copy.png"))
    ]
    assert report.train_counts == [3, 4] and report.imbalance_ratio == pytest.approx(4 / 3)
    assert not report.ok
    written = json.loads(report.write(tmp_path / "datacheck.json").read_text())
    assert written["duplicate_count"] == 1 and written["ok"] is False


def test_data_check_of_a_clean_generated_dataset_is_ok():
    report = check_dataset(load_dataset("shapes:per_class=10,size=16"))
    assert report.ok and report.train_counts == [10] * len(CLASSES)
