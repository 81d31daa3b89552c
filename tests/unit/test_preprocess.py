import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from builder.data import load_dataset
from server.errors import InvalidImage
from server.preprocess import (
    ImageTooLargeError,
    InvalidImageError,
    PreprocessSpec,
    decode_image,
    model_pixels,
    normalize,
    preprocess,
    preprocess_bytes,
)

IMAGENET = PreprocessSpec(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def reference_transform(spec: PreprocessSpec):
    return transforms.Compose(
        [
            transforms.Resize(spec.resize_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


@pytest.mark.parametrize("spec", [IMAGENET, PreprocessSpec(64, 73, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_preprocess_equals_torchvision_reference_eval_transform_on_real_photos(photos, spec):
    reference = reference_transform(spec)
    for path in photos:
        image = decode_image(path.read_bytes())
        ours = preprocess(image, spec)
        expected = reference(image.convert("RGB")).numpy()
        assert ours.shape == expected.shape == spec.input_shape
        # Within 1/255 of a pixel, in normalized units.
        assert np.max(np.abs(ours - expected)) <= (1 / 255) / min(spec.std) + 1e-6, path.name


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(8, 8), (31, 97), (224, 224), (257, 256), (640, 203), (1001, 777)])
def test_cropped_resize_equals_resize_then_crop_on_odd_sizes_and_upscaling(photos, size, interpolation):
    # The gateway resizes only the region the crop keeps; torchvision resizes the whole image first.
    image = decode_image(photos[0].read_bytes()).convert("RGB").resize(size)
    mode = transforms.InterpolationMode.BICUBIC if interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    for spec in (
        PreprocessSpec(24, 32, (0.5,) * 3, (0.25,) * 3, interpolation=interpolation),
        PreprocessSpec(224, 256, (0.5,) * 3, (0.25,) * 3, interpolation=interpolation),
        PreprocessSpec(20, 20, (0.5,), (0.25,), color_mode="L", interpolation=interpolation),
    ):
        reference = transforms.Compose(
            [
                transforms.Resize(spec.resize_size, interpolation=mode),
                transforms.CenterCrop(spec.image_size),
                transforms.ToTensor(),
                transforms.Normalize(spec.mean, spec.std),
            ]
        )
        expected = reference(image.convert(spec.color_mode)).numpy()
        ours = preprocess(image, spec)
        assert ours.shape == expected.shape
        assert np.max(np.abs(ours - expected)) <= (1 / 255) / min(spec.std) + 1e-6, (size, spec)


@pytest.mark.parametrize("color_mode", ["RGB", "BGR", "L"])
def test_normalize_maps_every_level_of_every_channel_as_the_formula_does(color_mode):
    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(
        16, 16, (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels], color_mode=color_mode
    )
    # 16 x 16 pixels hold all 256 levels; each channel gets them in a different order.
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels = np.stack([np.roll(levels, 37 * c) for c in range(channels)], axis=2)
    ordered = pixels[:, :, ::-1] if color_mode == "BGR" else pixels
    expected = np.stack([(ordered[:, :, c] / 255.0 - spec.mean[c]) / spec.std[c] for c in range(channels)])
    batch = np.full((2, channels, 16, 16), np.nan, dtype=np.float32)
    normalize(pixels[:, :, 0] if color_mode == "L" else pixels, spec, out=batch[1])
    np.testing.assert_allclose(batch[1], expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(batch[0]).all()  # the other slot is untouched


@pytest.mark.parametrize("color_mode, shape", [("L", (4, 4, 3)), ("RGB", (4, 4)), ("BGR", (4, 4, 4))])
def test_normalize_refuses_pixels_with_another_channel_count(color_mode, shape):
    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(4, 4, (0.5,) * channels, (0.25,) * channels, color_mode=color_mode)
    with pytest.raises(ValueError, match="channel"):
        normalize(np.zeros(shape, dtype=np.uint8), spec)


def test_grayscale_spec_converts_color_photos_to_one_channel(photos):
    spec = PreprocessSpec(32, 32, (0.3,), (0.3,), color_mode="L")
    tensor = preprocess_bytes(photos[0].read_bytes(), spec)
    assert tensor.shape == (1, 32, 32)
    assert tensor.dtype == np.float32


def test_bgr_spec_reverses_channels(photos):
    rgb = PreprocessSpec(32, 32, (0.5,) * 3, (0.25,) * 3)
    bgr = PreprocessSpec(32, 32, (0.5,) * 3, (0.25,) * 3, color_mode="BGR")
    data = photos[0].read_bytes()
    np.testing.assert_array_equal(preprocess_bytes(data, rgb)[::-1], preprocess_bytes(data, bgr))


def test_spec_round_trips_through_triton_parameters():
    spec = PreprocessSpec(32, 36, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), color_mode="BGR", interpolation="bicubic")
    parameters = spec.to_parameters()
    assert all(isinstance(v, str) for v in parameters.values())
    assert PreprocessSpec.from_parameters({**parameters, "labels": "[]"}) == spec


def test_spec_from_parameters_names_missing_keys():
    with pytest.raises(KeyError, match="mean"):
        PreprocessSpec.from_parameters(
            {"preprocess.image_size": "8", "preprocess.resize_size": "8", "preprocess.std": "[1]"}
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"color_mode": "CMYK"}, "color_mode"),
        ({"interpolation": "lanczos9"}, "interpolation"),
        ({"image_size": 300}, "resize_size"),
        ({"mean": (0.5,)}, "mean and std"),
        ({"std": (0.2, 0.0, 0.2)}, "positive"),
    ],
)
def test_spec_rejects_invalid_values_with_a_message(kwargs, message):
    values = {"image_size": 224, "resize_size": 256, "mean": (0.5,) * 3, "std": (0.2,) * 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**values)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_decode_rejects_non_images(data):
    with pytest.raises(InvalidImageError):
        decode_image(data)


def test_decode_rejects_truncated_jpeg(photos):
    data = photos[0].read_bytes()
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 3])


def test_decode_refuses_images_over_the_pixel_limit_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buffer, "PNG")
    with pytest.raises(ImageTooLargeError, match="400x300"):
        decode_image(buffer.getvalue(), max_pixels=100_000)
    assert decode_image(buffer.getvalue(), max_pixels=120_000).size == (400, 300)


def test_decode_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).size == (20, 40)


def test_transparent_pixels_become_white_not_black():
    buffer = io.BytesIO()
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(buffer, "PNG")
    spec = PreprocessSpec(16, 16, (0.0,) * 3, (1.0,) * 3)
    np.testing.assert_allclose(preprocess_bytes(buffer.getvalue(), spec), 1.0)


def test_training_eval_transform_is_the_gateway_preprocessing(photos):
    from builder.transforms import eval_transform

    spec = PreprocessSpec(48, 55, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    image = decode_image(photos[1].read_bytes())
    torch.testing.assert_close(eval_transform(spec)(image), torch.from_numpy(preprocess(image, spec)))


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_and_stays_close(photos):
    big = Image.open(photos[0]).convert("RGB").resize((1024, 1024))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    data = buffer.getvalue()
    assert decode_image(data, draft_size=256).size == (256, 256)
    assert decode_image(data).size == (1024, 1024)
    full = preprocess(decode_image(data), IMAGENET)
    drafted = preprocess(decode_image(data, draft_size=IMAGENET.resize_size), IMAGENET)
    pixel_error = np.abs(full - drafted) * np.asarray(IMAGENET.std)[:, None, None] * 255
    assert pixel_error.mean() < 2.0


def test_jpeg_draft_leaves_other_formats_alone(photos):
    png = next(p for p in photos if p.suffix == ".png")
    assert decode_image(png.read_bytes(), draft_size=16).size == Image.open(png).size


def test_preprocess_writes_into_a_batch_slot(photos):
    image = Image.open(photos[0])
    batch = np.full((2, *IMAGENET.input_shape), np.nan, dtype=np.float32)
    returned = preprocess(image, IMAGENET, out=batch[1])
    assert np.shares_memory(returned, batch)
    np.testing.assert_array_equal(batch[1], preprocess(image, IMAGENET))
    assert np.isnan(batch[0]).all()  # the other slot is untouched
    with pytest.raises(ValueError, match="out must be float32"):
        preprocess(image, IMAGENET, out=np.empty((3, 8, 8), dtype=np.float32))


def test_prepare_batch_keeps_request_order_and_reports_the_failing_image(photos):
    from server.errors import InvalidImage
    from server.preprocess import prepare_batch

    first, second = photos[1].read_bytes(), photos[0].read_bytes()
    batch, decode_s, preprocess_s = prepare_batch([first, second], IMAGENET, max_pixels=10**8)
    assert batch.shape == (2, *IMAGENET.input_shape) and decode_s > 0 and preprocess_s > 0
    np.testing.assert_array_equal(batch[0], preprocess_bytes(first, IMAGENET))
    np.testing.assert_array_equal(batch[1], preprocess_bytes(second, IMAGENET))
    with pytest.raises(InvalidImage, match="image 1"):
        prepare_batch([first, b"not an image"], IMAGENET, max_pixels=10**8)


@pytest.mark.parametrize("color_mode", ["RGB", "BGR", "L"])
def test_pixel_input_is_the_model_sized_image_in_the_model_channel_order(photos, color_mode):
    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(32, 40, (0.5,) * channels, (0.25,) * channels, color_mode=color_mode)
    data = photos[0].read_bytes()
    pixels = preprocess_bytes(data, spec, pixel_input=True)
    assert pixels.shape == (32, 32, channels) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    # Normalizing those pixels as the model does gives exactly what the gateway sends a float model.
    expected = preprocess_bytes(data, spec)
    normalized = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(normalized, expected, atol=1e-6)


def test_prepare_batch_of_pixels_fills_uint8_slots(photos):
    from server.preprocess import prepare_batch

    first, second = photos[1].read_bytes(), photos[0].read_bytes()
    batch, _, _ = prepare_batch([first, second], IMAGENET, max_pixels=10**8, pixel_input=True)
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1], preprocess_bytes(second, IMAGENET, pixel_input=True))
    with pytest.raises(ValueError, match="out must be uint8"):
        model_pixels(Image.open(photos[0]), IMAGENET, out=np.empty((224, 224, 3), dtype=np.float32))


def test_quick_to_preprocess_takes_baseline_jpegs_within_both_limits(photos):
    from server.preprocess import quick_to_preprocess

    jpegs = [photos[0].read_bytes(), photos[2].read_bytes()]
    pixels = sum(w * h for w, h in (Image.open(photos[0]).size, Image.open(photos[2]).size))
    size = sum(map(len, jpegs))
    assert quick_to_preprocess(jpegs, pixels, size)
    assert not quick_to_preprocess(jpegs, pixels - 1, size)
    assert not quick_to_preprocess(jpegs, pixels, size - 1)
    assert not quick_to_preprocess(jpegs, 0, size) and not quick_to_preprocess(jpegs, pixels, 0)
    # The header is enough: a truncated JPEG still counts (and fails later, where its error is reported).
    assert quick_to_preprocess([jpegs[0][:2000]], pixels, size)


def test_quick_to_preprocess_refuses_progressive_jpegs_other_formats_and_what_is_no_image(photos):
    from server.preprocess import quick_to_preprocess

    image = Image.open(photos[2])
    progressive, png = io.BytesIO(), io.BytesIO()
    image.save(progressive, "JPEG", progressive=True)  # the cost of its decoding grows with its scans
    image.save(png, "PNG")
    for data in (progressive.getvalue(), png.getvalue(), b"not an image", b"", b"\xff\xd8\xff"):
        assert not quick_to_preprocess([data], 10**9, 10**9), data[:8]
    assert not quick_to_preprocess([photos[2].read_bytes(), png.getvalue()], 10**9, 10**9)


def test_quick_to_preprocess_is_false_for_a_decompression_bomb(monkeypatch, photos):
    from server.preprocess import quick_to_preprocess

    # Pillow refuses to open an image of more than twice its limit; the thread pool reports that as a 413.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert not quick_to_preprocess([photos[2].read_bytes()], 10**9, 10**9)


# ---- large images: reduced before conversion, bounded per request and at once, memory handed back ----


def full_resolution_pixels(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The preprocessing before large images were reduced first: composite and convert every pixel, then
    resize (the crop box only). The reference the reduced path is held to."""
    from server.preprocess import INTERPOLATIONS, _resized_size

    mode = "L" if spec.color_mode == "L" else "RGB"
    if image.mode != mode:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert(mode)
    width, height = image.size
    new_width, new_height = _resized_size(width, height, spec.resize_size)
    top = int(round((new_height - spec.image_size) / 2.0))
    left = int(round((new_width - spec.image_size) / 2.0))
    if (new_width, new_height) == image.size:
        return image.crop((left, top, left + spec.image_size, top + spec.image_size))
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + spec.image_size) * scale_x, (top + spec.image_size) * scale_y)
    return image.resize((spec.image_size, spec.image_size), INTERPOLATIONS[spec.interpolation], box=box)


def level_difference(ours: Image.Image, reference: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(reference, dtype=np.int16))


# Stated tolerance of the reduced path against full resolution, in 8-bit levels: on average at most
# 0.5, and no pixel more than 8 off (edges of sharp detail, where the extra block mean blurs a little).
MEAN_LEVELS, MAX_LEVELS = 0.5, 8


@pytest.fixture
def reduce_any_size(monkeypatch):
    """The reduced path for images of any size: the sample photos' sharp detail at small model sizes is
    the hard case for it (a large photo holds the same detail, only spread over more pixels)."""
    import server.preprocess

    monkeypatch.setattr(server.preprocess, "REDUCE_MIN_PIXELS", 0)


SMALL_SPECS = [
    PreprocessSpec(32, 36, (0.5,) * 3, (0.25,) * 3),
    PreprocessSpec(24, 24, (0.5,) * 3, (0.25,) * 3, interpolation="bicubic"),
    PreprocessSpec(24, 28, (0.5,), (0.25,), color_mode="L"),
]


@pytest.mark.parametrize("spec", SMALL_SPECS)
def test_photos_reduced_before_resizing_stay_within_the_stated_tolerance(photos, spec, reduce_any_size):
    from server.preprocess import reduction_factor, to_model_pixels

    for path in photos:
        image = decode_image(path.read_bytes())
        assert reduction_factor(image.size, spec) != (1, 1), path.name  # these sizes do take the reduced path
        difference = level_difference(to_model_pixels(image, spec), full_resolution_pixels(image, spec))
        assert difference.mean() <= MEAN_LEVELS and difference.max() <= MAX_LEVELS, (path.name, spec)


@pytest.mark.parametrize(
    "spec",
    [
        IMAGENET,
        PreprocessSpec(64, 73, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        PreprocessSpec(20, 20, (0.5,), (0.25,), color_mode="L"),
    ],
)
def test_pixels_are_exactly_the_full_resolution_ones_where_no_reduction_applies(photos, spec):
    from server.preprocess import reduction_factor, to_model_pixels

    checked = 0
    for path in photos:
        image = decode_image(path.read_bytes())
        # Below REDUCE_MIN_PIXELS, which every sample photo is, nothing is reduced at any model size.
        if reduction_factor(image.size, spec) == (1, 1):
            np.testing.assert_array_equal(
                np.asarray(to_model_pixels(image, spec)),
                np.asarray(full_resolution_pixels(image, spec)),
                err_msg=path.name,
            )
            checked += 1
    assert checked == len(photos)


def with_transparency(photo: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """The photo at `size` with an alpha ramp (fully transparent to opaque) and a transparent hole."""
    rgb = photo.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    alpha = Image.linear_gradient("L").resize(size)
    alpha.paste(0, (size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2))
    if mode == "RGBA":
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), alpha))
    # P with a transparent palette index: the quantized photo, index 0 where alpha is low.
    palette = rgb.quantize(255)
    indices = np.asarray(palette) + 1
    indices[np.asarray(alpha) < 128] = 0
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([255, 0, 255] + palette.getpalette()[: 255 * 3])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("spec", [IMAGENET, SMALL_SPECS[2]])
def test_transparent_images_reduced_before_compositing_stay_within_the_stated_tolerance(photos, mode, spec):
    from server.preprocess import reduction_factor, to_model_pixels

    # Large enough (9 megapixels) to be reduced by default, by 2 at 224x224 and by 12 for the small spec.
    image = with_transparency(Image.open(photos[0]), mode, (3600, 2600))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == mode and reduction_factor(decoded.size, spec) != (1, 1)
    difference = level_difference(to_model_pixels(decoded, spec), full_resolution_pixels(decoded, spec))
    assert difference.mean() <= MEAN_LEVELS and difference.max() <= MAX_LEVELS, difference.max()


def test_a_large_transparent_area_is_white_after_reduction():
    buffer = io.BytesIO()
    Image.new("RGBA", (3000, 2000), (0, 0, 0, 0)).save(buffer, "PNG")
    spec = PreprocessSpec(16, 16, (0.0,) * 3, (1.0,) * 3)
    np.testing.assert_allclose(preprocess_bytes(buffer.getvalue(), spec), 1.0)


PEAK_RSS_SCRIPT = """
import sys
from server.preprocess import PreprocessSpec, preprocess_bytes

def peak_rss():  # this process's own high-water mark (ru_maxrss would carry over the parent's)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

data = open(sys.argv[1], "rb").read()
spec = PreprocessSpec(224, 256, (0.5,) * 3, (0.25,) * 3)
before = peak_rss()
preprocess_bytes(data, spec)
print(peak_rss() - before)
"""


@pytest.mark.spawns
def test_preprocessing_a_40_megapixel_transparent_png_peaks_below_twice_its_decoded_size(
    huge_transparent_png, tmp_path
):
    import os
    import subprocess
    import sys

    # A fresh process, so that the peak RSS is this image's alone.
    path = tmp_path / "huge.png"
    path.write_bytes(huge_transparent_png)
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=120,
        check=True,
    )
    decoded_bytes = 6324 * 6324 * 4
    peak = int(run.stdout.split()[-1])
    assert peak < 2 * decoded_bytes, f"peak RSS grew by {peak / 2**20:.0f} MiB"


def png_of(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 0).save(buffer, "PNG")
    return buffer.getvalue()


def test_prepare_batch_refuses_a_request_over_its_pixel_limit_before_decoding_any_image(monkeypatch):
    from server.errors import PayloadTooLarge
    from server.preprocess import prepare_batch

    images = [png_of((400, 300)), png_of((300, 200))]
    batch, _, _ = prepare_batch(images, IMAGENET, max_pixels=10**8, max_request_pixels=180_000)
    assert batch.shape[0] == 2
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image of a refused request"))
    with pytest.raises(PayloadTooLarge, match="180000 pixels in all, more than the limit of 179999"):
        prepare_batch(images, IMAGENET, max_pixels=10**8, max_request_pixels=179_999)


def test_decode_budget_bounds_large_decodes_by_count_and_pixels_and_lets_small_ones_pass():
    from server.preprocess import DecodeBudget, DecoderBusyError

    budget = DecodeBudget(pixels=10_000, large_image_pixels=1_000, decodes=2)
    with budget.hold(999) as large:
        assert not large and budget.held_decodes == 0
    with budget.hold(6_000), budget.hold(4_000) as large:
        assert large and budget.held_pixels == 10_000 and budget.held_decodes == 2
    with budget.hold(20_000):  # larger than the whole budget: decoded alone
        assert budget.held_pixels == 10_000
    assert budget.held_pixels == budget.held_decodes == 0
    with budget.hold(6_000):
        with pytest.raises(DecoderBusyError, match="1 other large image"), budget.hold(4_001):
            pass
        with budget.hold(4_000), pytest.raises(DecoderBusyError), budget.hold(1_000):
            pass  # two decodes held: a third is refused however small
        with budget.hold(999):  # not large: never refused
            pass
    with pytest.raises(KeyError), budget.hold(5_000):
        raise KeyError("a failed decode gives its share back")
    assert budget.held_pixels == budget.held_decodes == 0


def test_prepare_batch_refuses_large_images_when_the_budget_is_taken_and_gives_it_back():
    from server.errors import TooManyRequests
    from server.preprocess import DecodeBudget, prepare_batch

    budget = DecodeBudget(pixels=3_000_000, large_image_pixels=1_000_000, decodes=1)
    large, small = png_of((1200, 1000)), png_of((300, 200))
    with budget.hold(2_000_000):
        prepare_batch([small, small], IMAGENET, max_pixels=10**8, budget=budget)  # small: never waits
        with pytest.raises(TooManyRequests, match="retry") as refused:
            prepare_batch([small, large], IMAGENET, max_pixels=10**8, budget=budget)
        assert refused.value.retry_after_s
    with pytest.raises(InvalidImage):
        prepare_batch([large, b"not an image"], IMAGENET, max_pixels=10**8, budget=budget)
    assert budget.held_pixels == budget.held_decodes == 0
    prepare_batch([large, large], IMAGENET, max_pixels=10**8, budget=budget)


RSS_AFTER_TRIM_SCRIPT = """
import sys
from concurrent.futures import ThreadPoolExecutor
from server.preprocess import PreprocessSpec, preprocess_bytes, release_memory

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))

data = open(sys.argv[1], "rb").read()
spec = PreprocessSpec(224, 256, (0.5,) * 3, (0.25,) * 3)
with ThreadPoolExecutor(1) as pool:  # in a thread, as the gateway decodes, in that thread's malloc arena
    pool.submit(preprocess_bytes, data, spec).result()
    kept = rss()
    pool.submit(release_memory).result()
print(kept, rss())
"""


@pytest.mark.spawns
def test_release_memory_hands_a_large_decode_back_to_the_system(tmp_path):
    import os
    import subprocess
    import sys

    from server.settings import GATEWAY_MALLOC_ENV

    path = tmp_path / "large.png"
    path.write_bytes(png_of((4000, 3000), "RGBA"))
    # With the gateway's allocator settings, under which the freed pixels stayed with the process.
    run = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_TRIM_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **GATEWAY_MALLOC_ENV, "PYTHONPATH": os.getcwd()},
        timeout=120,
        check=True,
    )
    kept, trimmed = map(int, run.stdout.split())
    assert kept - trimmed > 24 * 2**20, f"RSS {kept / 2**20:.0f} MiB before malloc_trim, {trimmed / 2**20:.0f} after"


def test_prepare_batch_counts_a_requests_pixels_in_all_against_the_large_decode_budget():
    from server.errors import TooManyRequests
    from server.preprocess import DecodeBudget, prepare_batch

    # No image is large on its own (600x600 against 1 million), three of them are.
    budget = DecodeBudget(pixels=1_500_000, large_image_pixels=1_000_000, decodes=1)
    under = png_of((600, 600))
    with budget.hold(1_000_000):
        prepare_batch([under, under], IMAGENET, max_pixels=10**8, budget=budget)  # 720 000 in all: small
        with pytest.raises(TooManyRequests, match="retry"):
            prepare_batch([under] * 3, IMAGENET, max_pixels=10**8, budget=budget)
    assert budget.held_pixels == budget.held_decodes == 0
    prepare_batch([under] * 3, IMAGENET, max_pixels=10**8, budget=budget)


def _jpeg_with_exif(entries: list[tuple[int, int, int, int]]) -> bytes:
    """A 16 x 12 JPEG whose EXIF block holds `entries` (tag, type, count, value) and, at offset 26, one
    RATIONAL (1/2) for entries that point there."""
    import struct

    ifd = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0) + struct.pack("<II", 1, 2)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + ifd)
    return buffer.getvalue()


def test_a_malformed_exif_block_still_turns_the_image_by_its_orientation():
    from server.preprocess import decode_image

    # Orientation 6 (turn 90 degrees) beside a Make tag stored as a RATIONAL where the spec says ASCII:
    # Pillow cannot write such a block back, which once escaped as an AttributeError (a 500).
    image = decode_image(_jpeg_with_exif([(0x010F, 5, 1, 26), (0x0112, 3, 1, 6)]))
    assert image.size == (12, 16)
    plain = decode_image(_jpeg_with_exif([(0x0112, 3, 1, 6)]))
    assert plain.size == (12, 16)
    assert np.array_equal(np.asarray(image), np.asarray(plain))


def test_equalization_changes_the_input_and_is_off_for_old_specs():
    from server.preprocess import PreprocessSpec, preprocess

    image = load_dataset("shapes:per_class=2,size=16").train.images[0]
    plain = PreprocessSpec.from_dict({"image_size": 16, "resize_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert plain.equalize is False
    equalized = PreprocessSpec(16, 16, (0.5,) * 3, (0.25,) * 3, equalize=True)
    assert not np.array_equal(preprocess(image, plain), preprocess(image, equalized))


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    from server.preprocess import MAX_JPEG_SCANS, open_image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", progressive=True, quality=90)
    progressive = buffer.getvalue()
    assert open_image(progressive).format == "JPEG"  # a real progressive JPEG has about ten scans
    # Repeating a scan costs a few bytes each and a full pass over the image each at decode: a 1 MB file
    # of them once held a preprocessing thread for minutes.
    last_scan = progressive[progressive.rfind(b"\xff\xda") : -2]
    crafted = progressive[:-2] + last_scan * MAX_JPEG_SCANS + b"\xff\xd9"
    with pytest.raises(InvalidImageError, match="scans"):
        open_image(crafted)


def test_an_image_past_pillows_own_guard_is_refused_with_the_limit_that_was_set(monkeypatch):
    from server.preprocess import ImageTooLargeError, open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, "PNG")  # 10,000 pixels: past twice Pillow's limit
    with pytest.raises(ImageTooLargeError) as refused:
        open_image(buffer.getvalue(), max_pixels=1000)
    assert "1000" in str(refused.value) and "decompression bomb" not in str(refused.value)
