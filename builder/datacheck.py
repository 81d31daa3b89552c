"""A look at the data before training: class balance, unreadable files, blank images, train/val leaks.

Nothing here stops a run: the report is logged, written beside the run (`datacheck.json`) and left
for the user to judge. Unreadable files were already skipped by the loader (`ImageDataset.skipped`),
which warned about them; here they are counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import ImageDataset, Split

log = logging.getLogger(__name__)

# Pixel standard deviation (0..255 scale) below which an image counts as blank: a flat or almost flat
# frame, e.g. an all-black capture, carries no class evidence.
BLANK_STD = 2.0
MAX_LISTED = 20  # examples kept per finding in the report


@dataclass
class DataCheckReport:
    classes: list[str]
    train_counts: list[int]
    val_counts: list[int]
    imbalance_ratio: float  # most / least frequent class in the training split
    unreadable: list[str] = field(default_factory=list)
    blank: list[str] = field(default_factory=list)  # "train[12]" or a file path
    blank_count: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train image, identical val image)
    duplicate_count: int = 0

    @property
    def ok(self) -> bool:
        return not (self.unreadable or self.blank_count or self.duplicate_count)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return (
            f"{sum(self.train_counts)} train / {sum(self.val_counts)} val images, {len(self.classes)} classes, "
            f"imbalance {self.imbalance_ratio:.1f}x, {len(self.unreadable)} unreadable (skipped), "
            f"{self.blank_count} blank, {self.duplicate_count} train/val duplicates"
        )

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _name(split: Split, split_name: str, index: int) -> str:
    item = split.images[index]
    return str(item) if isinstance(item, Path) else f"{split_name}[{index}]"


def _scan(split: Split, split_name: str, mode: str) -> tuple[list[str], dict[str, list[int]]]:
    """Blank images and the pixel hash of every readable image of one split."""
    blank: list[str] = []
    hashes: dict[str, list[int]] = {}
    for index in range(len(split)):
        try:
            image = split.image(index, mode)
        except Exception as e:  # a file that passed the loader's check but does not decode
            log.warning("cannot read %s: %s", _name(split, split_name, index), e)
            continue
        pixels = np.asarray(image)
        if pixels.std() < BLANK_STD:
            blank.append(_name(split, split_name, index))
        digest = hashlib.sha1(f"{image.size}{mode}".encode() + pixels.tobytes()).hexdigest()
        hashes.setdefault(digest, []).append(index)
    return blank, hashes


def check_dataset(dataset: ImageDataset) -> DataCheckReport:
    """Class counts and imbalance, unreadable (skipped) files, blank images, identical images in train and val."""
    classes = list(dataset.classes)
    train_counts = np.bincount(dataset.train.labels, minlength=len(classes)).tolist()
    val_counts = np.bincount(dataset.val.labels, minlength=len(classes)).tolist()
    present = [c for c in train_counts if c > 0]
    imbalance = max(present) / min(present) if present else 0.0
    train_blank, train_hashes = _scan(dataset.train, "train", dataset.color_mode)
    val_blank, val_hashes = _scan(dataset.val, "val", dataset.color_mode)
    duplicates = [
        (_name(dataset.train, "train", t), _name(dataset.val, "val", v))
        for digest, val_indices in val_hashes.items()
        if digest in train_hashes
        for v in val_indices
        for t in train_hashes[digest][:1]
    ]
    blank = train_blank + val_blank
    return DataCheckReport(
        classes=classes,
        train_counts=train_counts,
        val_counts=val_counts,
        imbalance_ratio=float(imbalance),
        unreadable=[str(p) for p in dataset.skipped],
        blank=blank[:MAX_LISTED],
        blank_count=len(blank),
        duplicates=duplicates[:MAX_LISTED],
        duplicate_count=len(duplicates),
    )


def check_once(dataset: ImageDataset) -> tuple[DataCheckReport, bool]:
    """`check_dataset(dataset)`, computed once per dataset object (tune trains every trial on the same one),
    and whether this call computed it, i.e. whether the report is news to log."""
    if isinstance(dataset.data_check, DataCheckReport):
        return dataset.data_check, False
    report = check_dataset(dataset)
    dataset.data_check = report
    return report, True


def log_report(report: DataCheckReport) -> None:
    # Unreadable files are in the summary's count; the loader named them when it skipped them.
    log.info("data check: %s", report.summary())
    if report.blank_count:
        log.warning(
            "data check: %d blank (near-constant) images, e.g. %s", report.blank_count, ", ".join(report.blank[:5])
        )
    if report.duplicate_count:
        log.warning(
            "data check: %d validation images also in the training split (val accuracy is inflated), e.g. %s",
            report.duplicate_count,
            ", ".join(f"{a} = {b}" for a, b in report.duplicates[:3]),
        )
