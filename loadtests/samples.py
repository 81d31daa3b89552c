"""The default images of a load test: real photos that scikit-image ships, written at run time.

Several sizes, orientations and both JPEG and PNG, so decoding costs what it costs on real uploads.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_FOLDER = Path(".cache/loadtest-images")
# (file in skimage/data, format written): large and small, color and grayscale, landscape and portrait.
PHOTOS = (
    ("astronaut.png", "JPEG"),
    ("coffee.png", "JPEG"),
    ("chelsea.png", "PNG"),
    ("rocket.jpg", "JPEG"),
    ("motorcycle_left.png", "JPEG"),
    ("camera.png", "PNG"),
    ("hubble_deep_field.jpg", "JPEG"),
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def write_samples(folder: Path = DEFAULT_FOLDER) -> list[Path]:
    """Write the sample photos into `folder` (once) and return their paths."""
    import skimage
    from PIL import Image

    source = Path(skimage.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fmt in PHOTOS:
        path = folder / f"{Path(name).stem}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if not path.exists():
            image = Image.open(source / name)
            image = image.convert("RGB") if fmt == "JPEG" else image
            # Written under a temporary name, then renamed: workers starting together never read half a file.
            partial = path.with_suffix(".partial")
            image.save(partial, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            partial.replace(path)
        paths.append(path)
    return paths


def image_files(folder: Path) -> list[Path]:
    """The images in a folder, sorted, so every worker sends the same set."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


if __name__ == "__main__":
    # The images a containerized locust mounts (docker-compose.yml): `python -m loadtests.samples [FOLDER]`.
    import sys

    for written in write_samples(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER):
        print(written)
