"""`--dataset cifar10|cifar100` through torchvision's dataset classes, on tiny sets written in CIFAR's own
format (the pickled batches those classes read).

torchvision checks every file's MD5 against the published archive's. A tiny set cannot match those, so the
tests point the class's file lists at the MD5s of the files they wrote: the check still runs, and passes
for these files only.
"""

import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from torchvision import datasets

from builder.data import load_dataset

OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
# name: (class, label key, names key, train files, test file)
LAYOUT = {
    "cifar10": (datasets.CIFAR10, "labels", "label_names", [f"data_batch_{i}" for i in range(1, 6)], "test_batch"),
    "cifar100": (datasets.CIFAR100, "fine_labels", "fine_label_names", ["train"], "test"),
}


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tiny_cifar(root, name: str, monkeypatch, per_file: int = 4) -> dict[str, np.ndarray]:
    """Batches of random images in CIFAR's layout (rows of 3072 bytes: the red plane, then green, then blue),
    with the class's file lists pointed at their MD5s. Returns each file's rows."""
    cls, label_key, names_key, train_files, test_file = LAYOUT[name]
    folder = root / name / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = ["apple", "bus", "cat"]
    rows = {}
    for index, file_name in enumerate([*train_files, test_file]):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [(index + i) % len(classes) for i in range(per_file)]
        (folder / file_name).write_bytes(pickle.dumps({"data": data, label_key: labels}))
        rows[file_name] = data
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({names_key: classes}))
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, _md5(folder / test_file)]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    monkeypatch.setenv("BUILDER_DATASETS", str(root))
    return rows


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvisions_class(tmp_path, monkeypatch, name):
    rows = write_tiny_cifar(tmp_path, name, monkeypatch)
    train_files, test_file = LAYOUT[name][3], LAYOUT[name][4]
    dataset = load_dataset(name)
    assert dataset.classes == ["apple", "bus", "cat"]
    assert (len(dataset.train), len(dataset.val)) == (4 * len(train_files), 4)
    assert (dataset.color_mode, dataset.default_image_size, dataset.name) == ("RGB", 32, name)
    # The first test image, as the planes of its row say: pixel (0, 0) is bytes 0, 1024 and 2048.
    first = np.asarray(dataset.val.image(0, "RGB"))
    row = rows[test_file][0]
    assert first.shape == (32, 32, 3) and tuple(first[0, 0]) == (row[0], row[1024], row[2048])
    assert dataset.val.labels == [
        len(train_files) % 3,
        (len(train_files) + 1) % 3,
        (len(train_files) + 2) % 3,
        len(train_files) % 3,
    ]


@pytest.mark.spawns
def test_cifar_offline_is_one_line_and_leaves_no_partial_archive(tmp_path):
    root, out = tmp_path / "datasets", tmp_path / "run"
    env = {**os.environ, **OFFLINE, "BUILDER_DATASETS": str(root), "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "builder.cli", "train", "--dataset", "cifar10", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"builder train: error: cifar10: cannot download {datasets.CIFAR10.url}")
    assert f"extract that archive into {root / 'cifar10'}" in last and "Traceback" not in result.stderr
    assert not out.exists() and not (root / "cifar10" / datasets.CIFAR10.filename).exists()
