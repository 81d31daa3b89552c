"""Fixtures every tier may use, none of which trains: real sample photos and large transparent PNGs.
Fixtures that train live in tests/fixtures.py, imported by the tiers that need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import skimage
from PIL import Image

PHOTO_DIR = Path(skimage.__file__).parent / "data"
FUNCTIONAL = Path(__file__).parent / "functional"

# A gateway that a test starts runs in one worker process unless the test says otherwise: the limits
# tests check (in flight, connections, buffered bytes) hold per worker, and several workers would share
# a test's connections between them.
os.environ.setdefault("GATEWAY_WORKERS", "1")
# A gateway that a test stops refuses new requests for half a second before it exits, not the default 5 s:
# the suite stops some 60 gateways, and the tests of the drain itself set their own period.
os.environ.setdefault("GATEWAY_DRAIN_S", "0.5")
# In two test processes on two cores, each of PyTorch's thread pools would take both cores and wait on the
# thread the other process holds: trainings ran 5 to 7 times slower than alone. One thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


# Pillow's own pixel limit, as this process found it. An app sets the limit process-wide from its settings
# (server/app.py); in a test process shared by the tiers, an app of tests/functional (made once for a
# module) would otherwise set it for the tests after it, which then fail or pass by the order they ran in.
# Those apps' own tests keep the limit their app set; tests/gateway sets the gateway's default per test.
PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def pillows_pixel_limit_as_found(request, monkeypatch):
    if not Path(str(request.node.path)).is_relative_to(FUNCTIONAL):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_IMAGE_PIXELS)


# tryfirst: xdist's worker turns xdist_group markers into its groups in its own hook of this name, which
# would otherwise run before this one and see no marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # `make test` runs the suite in two processes (pytest-xdist, --dist loadgroup). The tests of the real
    # stack stay together, one after another in one of them: they start Triton servers, whose Python
    # backends' scratch folders are told apart by when they appear, and they mostly wait on those servers,
    # while the other process trains and checks models on the cores they leave idle.
    # They go first: the longest share of the suite, started at once in one process while the other process
    # takes everything else.
    functional = [item for item in items if Path(str(item.path)).is_relative_to(FUNCTIONAL)]
    for item in functional:
        item.add_marker(pytest.mark.xdist_group("servers"))
    items[:] = functional + [item for item in items if not Path(str(item.path)).is_relative_to(FUNCTIONAL)]


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos of several sizes and orientations, as JPEG and PNG files."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, fmt in (
        ("astronaut.png", "JPEG"),
        ("coffee.png", "PNG"),
        ("chelsea.png", "JPEG"),
        ("rocket.jpg", "JPEG"),
        ("camera.png", "PNG"),
    ):
        image = Image.open(PHOTO_DIR / name)
        path = folder / f"{Path(name).stem}.{fmt.lower()}"
        image.save(path, fmt)
        paths.append(path)
    # A portrait one, so both resize branches run.
    portrait = folder / "coffee-portrait.jpeg"
    Image.open(PHOTO_DIR / "coffee.png").transpose(Image.Transpose.ROTATE_90).save(portrait, "JPEG")
    paths.append(portrait)
    return paths


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
        draw.ellipse(
            (small_side // 2 - radius, small_side // 2 - radius, small_side // 2 + radius, small_side // 2 + radius),
            fill=(ring * 40 % 256, ring * 90 % 256, ring * 150 % 256, 60 + ring * 15),
        )
    buffer = io.BytesIO()
    small.resize((side, side), Image.Resampling.NEAREST).save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def huge_transparent_png() -> bytes:
    """6324 x 6324 RGBA (40 megapixels, under the gateway's default limit) in about 190 KB."""
    return transparent_png(6324)
