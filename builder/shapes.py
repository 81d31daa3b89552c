"""`shapes`: a procedurally generated RGB dataset of geometric shapes, seeded and reproducible.

Each image shows one shape (the class) in a random color, size, position and rotation on a plain,
gradient or noisy background, with pixel noise on top. The training split can be made imbalanced
(`imbalance=10`: the first class has 10x the images of the last, geometric in between); the
validation split is generated separately and always balanced, so that accuracy and macro recall on
it weigh every class the same, whatever the training imbalance. It is drawn from its own seeded
stream, so it is the same images whatever `imbalance` is.

Options travel inside the dataset name, `shapes:per_class=300,imbalance=10,size=32`, so every
stage that reloads a run's dataset from its recorded name (evaluate, export, prune) gets the same
images back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw

from .errors import DatasetError

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
BACKGROUNDS = ("plain", "gradient", "noise")
NAME = "shapes"
# Shapes are drawn into a mask this many times larger, then downsampled: smooth edges at any size.
SUPERSAMPLE = 4
MIN_CONTRAST = 90.0  # Euclidean RGB distance between the shape and the mean background color
PIXEL_NOISE_STD = 6.0


@dataclass(frozen=True)
class ShapesOptions:
    per_class: int = 200  # training images of the most frequent class
    imbalance: float = 1.0  # most frequent / least frequent class in the training split
    size: int = 32  # image side in pixels

    def __post_init__(self) -> None:
        if self.per_class < 2:
            raise DatasetError(f"shapes: per_class must be at least 2, got {self.per_class}")
        if not self.imbalance >= 1.0:
            raise DatasetError(f"shapes: imbalance must be >= 1 (largest / smallest class), got {self.imbalance}")
        if self.size < 8:
            raise DatasetError(f"shapes: size must be at least 8 pixels, got {self.size}")

    def source(self) -> str:
        """The dataset name that reloads exactly these images: `shapes` for the defaults."""
        changed = [f"{f.name}={getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name) != f.default]
        return NAME + (":" + ",".join(changed) if changed else "")

    def train_counts(self) -> list[int]:
        """Images per class in the training split: geometric from `per_class` down to `per_class / imbalance`."""
        last = len(CLASSES) - 1
        return [max(1, round(self.per_class * self.imbalance ** (-i / last))) for i in range(len(CLASSES))]


def is_shapes(source: str) -> bool:
    return source == NAME or source.startswith(NAME + ":")


def parse_source(source: str) -> ShapesOptions:
    """`shapes` or `shapes:key=value,...` -> options; unknown keys and bad values are DatasetErrors."""
    _, _, text = source.partition(":")
    types = {f.name: f.type for f in fields(ShapesOptions)}
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in types:
            raise DatasetError(f"shapes: unknown option {key!r}; valid: {', '.join(types)}")
        try:
            values[key] = float(value) if key == "imbalance" else int(value)
        except ValueError:
            raise DatasetError(f"shapes: option {key} needs a number, got {value!r}") from None
    return ShapesOptions(**values)


def with_options(
    source: str, *, per_class: int | None = None, imbalance: float | None = None, size: int | None = None
) -> str:
    """`source` with the given shapes options applied (a DatasetError if they are given for another dataset)."""
    given = {k: v for k, v in (("per_class", per_class), ("imbalance", imbalance), ("size", size)) if v is not None}
    if not given:
        return source
    if not is_shapes(source):
        raise DatasetError(f"--shapes-* options apply to --dataset shapes, not {source!r}")
    options = parse_source(source)
    return replace(
        options,
        per_class=options.per_class if per_class is None else per_class,
        imbalance=options.imbalance if imbalance is None else imbalance,
        size=options.size if size is None else size,
    ).source()


# ---- drawing ----


def _polygon(center: tuple[float, float], radii: list[float], angle: float) -> list[tuple[float, float]]:
    count = len(radii)
    return [
        (
            center[0] + r * math.cos(angle + 2 * math.pi * i / count),
            center[1] + r * math.sin(angle + 2 * math.pi * i / count),
        )
        for i, r in enumerate(radii)
    ]


def _draw_mask(shape: str, side: int, center: tuple[float, float], radius: float, angle: float) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = center
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        draw.polygon(_polygon(center, [radius] * 4, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(center, [radius] * 3, angle), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(center, [radius, radius * 0.42] * 5, angle), fill=255)
    elif shape == "cross":
        arm = radius * 0.32
        for turn in (0.0, math.pi / 2):
            a = angle + turn
            along, across = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
            draw.polygon(
                [
                    (cx + s * radius * along[0] + t * arm * across[0], cy + s * radius * along[1] + t * arm * across[1])
                    for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))
                ],
                fill=255,
            )
    else:
        raise ValueError(shape)
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    first = rng.uniform(0, 255, 3)
    if kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).copy()
    if kind == "gradient":
        second = rng.uniform(0, 255, 3)
        direction = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = xs * math.cos(direction) + ys * math.sin(direction)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return first * (1 - t[..., None]) + second * t[..., None]
    return first + rng.normal(0, 25, (size, size, 3))


def _shape_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(50):
        color = rng.uniform(0, 255, 3)
        if np.linalg.norm(color - mean) >= MIN_CONTRAST:
            return color
    return 255.0 - mean  # the far corner of the color cube always contrasts


def render(shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One `size` x `size` RGB image of `shape`, every random choice drawn from `rng`."""
    background = _background(rng, size)
    color = _shape_color(rng, background)
    side = size * SUPERSAMPLE
    radius = rng.uniform(0.22, 0.42) * side
    margin = radius * 0.8  # a shape may touch the border, never leave the image
    center = (rng.uniform(margin, side - margin), rng.uniform(margin, side - margin))
    mask = _draw_mask(shape, side, center, radius, rng.uniform(0, 2 * math.pi))
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255.0
    pixels = background * (1 - alpha) + color * alpha + rng.normal(0, PIXEL_NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def generate(counts: list[int], *, size: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """`counts[i]` images of class i, classes interleaved so the stream does not depend on class order."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(max(counts)):
        for label, count in enumerate(counts):
            if index < count:
                images.append(render(CLASSES[label], rng, size))
                labels.append(label)
    return images, labels


@dataclass(frozen=True)
class ShapesSplits:
    """The generated images of one `shapes` dataset (`builder.data.load_dataset` makes it an ImageDataset)."""

    name: str
    size: int
    train_images: list[Image.Image]
    train_labels: list[int]
    val_images: list[Image.Image]
    val_labels: list[int]


def load_shapes(source: str, *, val_fraction: float, seed: int) -> ShapesSplits:
    """The `shapes` dataset named by `source`: imbalanced (if asked) training split, balanced validation split."""
    options = parse_source(source)
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    val_per_class = max(2, round(options.per_class * val_fraction / (1.0 - val_fraction)))
    # Two independent streams: the validation images do not change with the training imbalance.
    train_images, train_labels = generate(options.train_counts(), size=options.size, seed=2 * seed)
    val_images, val_labels = generate([val_per_class] * len(CLASSES), size=options.size, seed=2 * seed + 1)
    return ShapesSplits(options.source(), options.size, train_images, train_labels, val_images, val_labels)
