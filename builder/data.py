"""Datasets as labelled PIL images, split into train and validation, and the spec resolved from them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from server.preprocess import PreprocessSpec, to_model_pixels

from .errors import DatasetError
from .shapes import CLASSES as SHAPE_CLASSES
from .shapes import is_shapes, load_shapes
from .train_config import CROP_FRACTION

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("digits", "shapes", "cifar10", "cifar100")
# torchvision's dataset classes, downloaded into DATASETS_ENV's folder (default DEFAULT_DATASETS_ROOT).
CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
DATASETS_ENV = "BUILDER_DATASETS"
DEFAULT_DATASETS_ROOT = Path("~/.cache/builder/datasets")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Split:
    """Images (in memory, or paths loaded on access) with their class indices."""

    images: Sequence[Image.Image | Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int, mode: str) -> Image.Image:
        item = self.images[index]
        if isinstance(item, Path):
            with Image.open(item) as opened:
                item = opened.convert(mode)
        return item if item.mode == mode else item.convert(mode)


@dataclass
class ImageDataset:
    name: str
    classes: list[str]
    color_mode: str  # "L" or "RGB": what the images are, and what the model takes
    default_image_size: int
    train: Split
    val: Split
    # Whether a mirrored image is still an image of its class (photos, shapes: yes; digits: no).
    flip_invariant: bool = True
    # Files found but unreadable, left out of both splits.
    skipped: list[Path] = field(default_factory=list)
    # datacheck.check_once's report on this very object (typed there: datacheck imports this module); not
    # copied by dataclasses.replace(), so that a dataset made from another one is checked anew.
    data_check: object = field(default=None, init=False, repr=False, compare=False)


def load_dataset(source: str, *, val_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """`digits` (scikit-learn's bundled 8x8 digits), `shapes[:options]` (builder/shapes.py, generated),
    `cifar10`/`cifar100` (torchvision's classes; their own test set is the validation split) or a folder of
    class subfolders (ImageFolder; unreadable images are skipped with a warning)."""
    if source == "digits":
        return _digits(val_fraction, seed)
    if source in CIFAR:
        return _cifar(source)
    if is_shapes(source):
        shapes = load_shapes(source, val_fraction=val_fraction, seed=seed)
        return ImageDataset(
            name=shapes.name,
            classes=list(SHAPE_CLASSES),
            color_mode="RGB",
            default_image_size=shapes.size,
            train=Split(shapes.train_images, shapes.train_labels),
            val=Split(shapes.val_images, shapes.val_labels),
        )
    path = Path(source)
    if not path.exists():
        raise DatasetError(
            f"dataset {source!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing folder"
        )
    return _image_folder(path, val_fraction, seed)


def load_run_dataset(recipe: Mapping) -> ImageDataset:
    """The dataset, split as a training run split it (`ModelMeta.dataset_recipe`, or an ONNX file's)."""
    return load_dataset(recipe["source"], val_fraction=recipe["val_fraction"], seed=recipe["seed"])


def _stratified(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    indices = list(range(len(labels)))
    train, val = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    return sorted(train), sorted(val)


def _digits(val_fraction: float, seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to 8-bit grayscale so they are ordinary images.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L") for p in pixels]
    labels = [int(t) for t in digits.target]
    train, val = _stratified(labels, val_fraction, seed)
    return ImageDataset(
        name="digits",
        classes=[str(c) for c in digits.target_names],
        color_mode="L",
        default_image_size=32,
        train=Split([images[i] for i in train], [labels[i] for i in train]),
        val=Split([images[i] for i in val], [labels[i] for i in val]),
        flip_invariant=False,
    )


def datasets_root() -> Path:
    """Where downloaded datasets are kept: $BUILDER_DATASETS, or ~/.cache/builder/datasets."""
    return Path(os.environ.get(DATASETS_ENV) or DEFAULT_DATASETS_ROOT).expanduser()


class ArrayImages(Sequence):
    """N x H x W (x C) uint8 pixels as PIL images, each made when it is read: 60,000 CIFAR images stay one array."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index):  # type: ignore[override]  # slices are not needed by any caller
        return Image.fromarray(self.pixels[index])


def _cifar(name: str) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 through torchvision's class, which checks every file's MD5 and downloads (with a
    progress bar) what is missing or corrupt. The official test set is the validation split."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    root = datasets_root() / name
    cls = getattr(datasets, CIFAR[name])
    try:
        splits = [cls(str(root), train=train, download=True) for train in (True, False)]
    except OSError as e:  # no network (URLError is an OSError), an unwritable folder, a truncated archive
        # torchvision opens the archive's file before it connects: an empty or partial one would stay behind.
        archive = root / cls.filename
        if archive.is_file() and not check_integrity(str(archive), cls.tgz_md5):
            archive.unlink()
        reason = getattr(e, "reason", None) or e.strerror or e
        raise DatasetError(
            f"{name}: cannot download {cls.url} ({reason}); without network access, extract that archive "
            f"into {root} (or set {DATASETS_ENV} to a folder holding {name}/{cls.base_folder})"
        ) from e
    except RuntimeError as e:  # torchvision: files present but failing their MD5 check after the download
        raise DatasetError(f"{name}: {root}: {' '.join(str(e).split())}") from e
    train, val = splits
    return ImageDataset(
        name=name,
        classes=list(train.classes),
        color_mode="RGB",
        default_image_size=32,
        train=Split(ArrayImages(train.data), [int(t) for t in train.targets]),
        val=Split(ArrayImages(val.data), [int(t) for t in val.targets]),
    )


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure without decoding every pixel
        return True
    except Exception:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for broken files
        return False


# Unreadable files already warned about in this process: a build loads its dataset more than once.
_reported_unreadable: set[Path] = set()


def _warn_unreadable(folder: Path, unreadable: list[Path]) -> None:
    new = [f for f in unreadable if f.resolve() not in _reported_unreadable]
    _reported_unreadable.update(f.resolve() for f in new)
    if new:
        log.warning(
            "skipping %d unreadable image(s) in %s: %s",
            len(new),
            folder,
            ", ".join(f.name for f in new[:5]) + (" ..." if len(new) > 5 else ""),
        )
    if len(new) < len(unreadable):
        log.debug("skipping %d unreadable image(s) in %s, as before", len(unreadable) - len(new), folder)


def _scan_classes(root: Path, skipped: list[Path]) -> tuple[list[str], list[Path], list[int]]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"dataset folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        unreadable = [f for f in files if not _readable(f)]
        if unreadable:
            _warn_unreadable(root / name, unreadable)
            skipped += unreadable
            files = [f for f in files if f not in set(unreadable)]
        if not files:
            raise DatasetError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [index] * len(files)
    return classes, paths, labels


def _image_folder(root: Path, val_fraction: float, seed: int) -> ImageDataset:
    skipped: list[Path] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_paths, train_labels = _scan_classes(root / "train", skipped)
        val_classes, val_paths, val_labels = _scan_classes(root / "val", skipped)
        if val_classes != classes:
            raise DatasetError(f"{root}/train and {root}/val have different class folders")
        train, val = Split(train_paths, train_labels), Split(val_paths, val_labels)
    else:
        classes, paths, labels = _scan_classes(root, skipped)
        if len(paths) < 2 * len(classes):
            raise DatasetError(f"dataset folder {root} needs at least two images per class to split")
        train_idx, val_idx = _stratified(labels, val_fraction, seed)
        train = Split([paths[i] for i in train_idx], [labels[i] for i in train_idx])
        val = Split([paths[i] for i in val_idx], [labels[i] for i in val_idx])
    return ImageDataset(
        name=str(root),
        classes=classes,
        color_mode="RGB",
        default_image_size=224,
        train=train,
        val=val,
        skipped=skipped,
    )


def resolve_spec(
    dataset: ImageDataset,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    equalize: bool = False,
    max_images: int = 2000,
    crop_fraction: float = CROP_FRACTION,
) -> PreprocessSpec:
    """The eval preprocessing for this dataset: size, crop, equalization and mean/std (given, or measured on
    the training split after the same geometry and equalization). `crop_fraction`: crop / resize for inputs
    above 64 pixels (pretrained weights bring their own, e.g. 224 / 256)."""
    size = image_size or dataset.default_image_size
    # Images no larger than the input (digits) are resized straight to it; photos get the usual crop margin.
    resize = size if size <= 64 else int(round(size / crop_fraction))
    channels = 1 if dataset.color_mode == "L" else 3
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise DatasetError(f"--{name} needs {channels} value(s) for {dataset.color_mode} images, got {len(values)}")
    if std is not None and any(v <= 0 for v in std):
        raise DatasetError(f"--std values must be positive, got {', '.join(map(str, std))}")
    if mean is None or std is None:
        geometry = PreprocessSpec(
            size, resize, (0.0,) * channels, (1.0,) * channels, dataset.color_mode, equalize=equalize
        )
        count = min(len(dataset.train), max_images)
        rng = np.random.default_rng(0)
        chosen = rng.choice(len(dataset.train), size=count, replace=False)
        pixels = (
            np.stack(
                [np.asarray(to_model_pixels(dataset.train.image(int(i), dataset.color_mode), geometry)) for i in chosen]
            ).astype(np.float64)
            / 255.0
        )
        pixels = pixels.reshape(count, size, size, channels)
        mean = mean or tuple(float(v) for v in pixels.mean(axis=(0, 1, 2)))
        std = std or tuple(max(float(v), 1e-3) for v in pixels.std(axis=(0, 1, 2)))
    return PreprocessSpec(
        image_size=size,
        resize_size=resize,
        mean=tuple(mean),
        std=tuple(std),
        color_mode=dataset.color_mode,
        equalize=equalize,
    )


class TorchSplit(Dataset):
    """A split as a torch Dataset: PIL image -> `transform` -> CHW float tensor."""

    def __init__(self, split: Split, mode: str, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.split, self.mode, self.transform = split, mode, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.image(index, self.mode)), self.split.labels[index]
