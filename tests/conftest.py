"""Shared fixtures: a tiny model trained by the builder, its ONNX export, and real sample photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage
from PIL import Image

from builder.export import export_onnx
from builder.train import train
from builder.train_config import TrainConfig

PHOTO_DIR = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """ResNet-18 on digits at 8x8 for two epochs (a few seconds): best.pt and model.onnx."""
    run_dir = tmp_path_factory.mktemp("run")
    result = train(TrainConfig(dataset="digits", epochs=2, image_size=8, out_dir=run_dir))
    export_onnx(result.best_checkpoint, run_dir / "model.onnx", parity_images=16)
    return run_dir


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos of several sizes and orientations, as JPEG and PNG files."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, fmt in (("astronaut.png", "JPEG"), ("coffee.png", "PNG"), ("chelsea.png", "JPEG"),
                      ("rocket.jpg", "JPEG"), ("camera.png", "PNG")):
        image = Image.open(PHOTO_DIR / name)
        path = folder / f"{Path(name).stem}.{fmt.lower()}"
        image.save(path, fmt)
        paths.append(path)
    # A portrait one, so both resize branches run.
    portrait = folder / "coffee-portrait.jpeg"
    Image.open(PHOTO_DIR / "coffee.png").transpose(Image.Transpose.ROTATE_90).save(portrait, "JPEG")
    paths.append(portrait)
    return paths


@pytest.fixture(scope="session")
def small_digits():
    """A 200/80-image slice of the digits split: enough to train at 8x8 for an epoch in about a second."""
    import dataclasses

    from builder.data import Split, load_dataset

    full = load_dataset("digits")
    return dataclasses.replace(full, train=Split(full.train.images[:200], full.train.labels[:200]),
                               val=Split(full.val.images[:80], full.val.labels[:80]))


def transparent_png(side: int, compress_level: int = 9) -> bytes:
    """A `side` x `side` RGBA PNG of nested translucent rings on transparency: a few hundred KB that
    decode to side * side * 4 bytes."""
    import io

    from PIL import ImageDraw

    small_side = max(side // 12, 16)
    small = Image.new("RGBA", (small_side, small_side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(small)
    for ring in range(12):
        radius = small_side // 2 - ring * small_side // 26
        draw.ellipse((small_side // 2 - radius, small_side // 2 - radius, small_side // 2 + radius,
                      small_side // 2 + radius),
                     fill=(ring * 40 % 256, ring * 90 % 256, ring * 150 % 256, 60 + ring * 15))
    buffer = io.BytesIO()
    small.resize((side, side), Image.Resampling.NEAREST).save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def huge_transparent_png() -> bytes:
    """6324 x 6324 RGBA (40 megapixels, under the gateway's default limit) in about 190 KB."""
    return transparent_png(6324)
