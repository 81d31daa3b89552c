"""The preprocessing spec a model was trained with, and the one function that applies it.

Training's eval transform, calibration, the gateway and the local gRPC client all call
`preprocess()` with the spec that `builder publish` wrote into the model's `config.pbtxt`,
so what the model sees at serving time is what it saw at validation time.

Only Pillow and NumPy here: the gateway image carries no torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

from .errors import RETRY_AFTER_S, InvalidImage, PayloadTooLarge, TooManyRequests

log = logging.getLogger(__name__)

COLOR_MODES = ("RGB", "BGR", "L")
# libjpeg-turbo's djpeg offers -maxscans for the same reason; 100 is far above what encoders write.
MAX_JPEG_SCANS = 100
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Triton's config.pbtxt parameters are a flat string map; these keys hold the spec there.
PARAMETER_PREFIX = "preprocess."
# Triton datatype of the input of a model that takes 8-bit pixels (`builder publish --pixel-input`).
PIXEL_DATATYPE = "UINT8"
# A UINT8 input of these dims (besides the batch axis) takes the encoded image bytes as they came, padded with
# zeros to the longest of a batch, and decodes them itself (`builder publish --preprocess gpu`: DALI's nvJPEG).
ENCODED_INPUT_DIMS = (-1,)
# What DALI's image decoder reads of what the gateway accepts (fn.decoders.image: JPEG, PNG, BMP, WebP, ...;
# no GIF).
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Whether the model's measured top-1 allows JPEGs decoded at reduced scale (`builder evaluate
# --gateway-decode` measures it, `builder publish` writes it with the two accuracies): "true" or "false".
REDUCED_SCALE_PARAMETER = "decode.reduced_scale"


class InvalidImageError(ValueError):
    """The bytes are not an image this gateway can decode."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than the configured limit."""


class DecoderBusyError(RuntimeError):
    """Decoding this large image now would exceed the budget of large decodes at once."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw images become the model's input tensor (NCHW float32)."""

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_mode: str = "RGB"
    interpolation: str = "bilinear"
    # Histogram equalization of the model-sized image (Pillow's ImageOps.equalize, per channel).
    equalize: bool = False
    layout: str = field(default="NCHW", init=False)

    def __post_init__(self) -> None:
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode {self.color_mode!r} is not one of {', '.join(COLOR_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise ValueError(
                f"need 0 < image_size <= resize_size, got image_size={self.image_size} resize_size={self.resize_size}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values for color_mode {self.color_mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> PreprocessSpec:
        return cls(
            image_size=int(data["image_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            color_mode=str(data.get("color_mode", "RGB")),
            interpolation=str(data.get("interpolation", "bilinear")),
            equalize=_flag(data.get("equalize", False)),
        )

    def to_parameters(self) -> dict[str, str]:
        """Flat string map for Triton's `parameters` section."""
        return {
            f"{PARAMETER_PREFIX}{key}": json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            for key, value in self.to_dict().items()
        }

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> PreprocessSpec:
        values = {
            key[len(PARAMETER_PREFIX) :]: value for key, value in parameters.items() if key.startswith(PARAMETER_PREFIX)
        }
        missing = {"image_size", "resize_size", "mean", "std"} - values.keys()
        if missing:
            raise KeyError(f"model config lacks preprocessing parameters: {', '.join(sorted(missing))}")
        values["mean"] = json.loads(values["mean"])
        values["std"] = json.loads(values["std"])
        return cls.from_dict(values)


def allows_reduced_scale(parameters: Mapping[str, str]) -> bool:
    """Whether a model's config parameters allow decoding its JPEGs at reduced scale; absent: no."""
    return parameters.get(REDUCED_SCALE_PARAMETER, "").strip().lower() == "true"


def _flag(value) -> bool:
    # Triton parameters are strings: "True"/"False" come back from to_parameters().
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"equalize must be true or false, got {value!r}")
        return value.strip().lower() in ("true", "1")
    return bool(value)


# Only these decoders are reachable from a request: bugs in Pillow's rarer format plugins stay out of reach.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


def open_image(
    data: bytes, *, max_pixels: int | None = None, formats: tuple[str, ...] = ACCEPTED_FORMATS
) -> Image.Image:
    """Read only the header of an image: its format, mode and size, no pixel decoded yet; refused past
    `max_pixels`."""
    if not data:
        raise InvalidImageError("empty image")
    with _decoding_errors(formats):
        image = Image.open(io.BytesIO(data), formats=formats)
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} pixels, more than the limit of {max_pixels}")
    if image.format == "JPEG":
        # Each scan of a progressive JPEG is a pass over the whole image at decode time, and a scan can
        # take a dozen bytes: a small file of thousands of them holds a thread for minutes. Encoders
        # write about ten; 0xFFDA (start of scan) cannot occur inside entropy-coded data (0xFF is
        # stuffed there), so counting it counts scans (plus one per embedded EXIF thumbnail).
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise InvalidImageError(f"a JPEG of {scans} scans; at most {MAX_JPEG_SCANS} are decoded")
    return image


def load_image(image: Image.Image, *, draft_size: int | None = None) -> Image.Image:
    """Decode the pixels of an image from `open_image`, with EXIF orientation applied (first frame of
    animations). With `draft_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose sides
    stay >= draft_size: several times faster on large photos, at the price of pixels that differ slightly
    from a full decode."""
    with _decoding_errors(ACCEPTED_FORMATS):
        if draft_size and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
    _apply_orientation(image)
    return image


def _apply_orientation(image: Image.Image) -> None:
    """Turn the image as its EXIF orientation says. In place: without an orientation tag, the copying
    variant would copy every pixel for nothing.

    Pillow turns the pixels first, then writes the EXIF block back without the tag; a block it cannot
    write (a tag of the wrong type, a truncated entry) raises whatever its parser met (AttributeError,
    struct.error, TypeError, ...). The pixels are what the model sees: a block it cannot read or write
    leaves them as they are by then, never an error."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - any failure inside Pillow's EXIF code; see above
        log.debug("EXIF block not rewritten after orientation", exc_info=True)


def decode_image(
    data: bytes,
    *,
    max_pixels: int | None = None,
    formats: tuple[str, ...] = ACCEPTED_FORMATS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode bytes into a PIL image with EXIF orientation applied (first frame of animations).

    The pixel count is checked from the header, before any pixel is decoded (see `load_image` for
    `draft_size`).
    """
    return load_image(open_image(data, max_pixels=max_pixels, formats=formats), draft_size=draft_size)


@contextmanager
def _decoding_errors(formats: tuple[str, ...]) -> Iterator[None]:
    try:
        yield
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow refuses at twice its limit, in its own words; the answer names the limit that was set.
        raise ImageTooLargeError(f"image has more than twice the limit of {Image.MAX_IMAGE_PIXELS} pixels") from e
    except Image.UnidentifiedImageError as e:
        raise InvalidImageError(f"not an image in an accepted format ({', '.join(formats)})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "broken image"
        raise InvalidImageError(f"cannot decode image: {e}") from e


class DecodeBudget:
    """How many large decodes (a request's images of at least `large_image_pixels` in all) run at once,
    and their pixels in all. A decode that would go past either is refused at once instead of waiting: a
    waiting thread would be one fewer for the small requests, which is what the bound is there to protect."""

    def __init__(self, pixels: int, large_image_pixels: int, decodes: int) -> None:
        self.pixels, self.large_image_pixels, self.decodes = pixels, large_image_pixels, decodes
        self._lock = threading.Lock()
        self.held_pixels = self.held_decodes = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[bool]:
        """Hold `pixels` of the budget (if they make a large image) while the block runs; yields whether
        they did. An image larger than the whole budget takes all of it."""
        if pixels < self.large_image_pixels:
            yield False
            return
        needed = min(pixels, self.pixels)
        with self._lock:
            if self.held_decodes >= self.decodes or self.held_pixels + needed > self.pixels:
                raise DecoderBusyError(
                    f"the gateway is decoding {self.held_decodes} other large image(s) of {self.held_pixels} "
                    f"pixels in all, its limit at once; retry shortly"
                )
            self.held_pixels += needed
            self.held_decodes += 1
        try:
            yield True
        finally:
            with self._lock:
                self.held_pixels -= needed
                self.held_decodes -= 1


@lru_cache(maxsize=1)
def _malloc_trim():
    library = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(library).malloc_trim if library else None
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def release_memory() -> bool:
    """Hand freed heap memory back to the system (glibc's malloc_trim). The pixels of a large image are
    freed in blocks that glibc keeps for reuse, so after one the process would stay hundreds of MB larger
    for no purpose. Returns whether there was a malloc_trim to call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def quick_to_preprocess(images: list[bytes], max_pixels: int, max_bytes: int) -> bool:
    """Whether the images are sure to decode quickly, by their size and headers alone: baseline JPEGs of
    at most `max_bytes` and `max_pixels` in all. Such a JPEG costs time in proportion to those two (Pillow
    reads its header in Python, about 0.5 us a byte); a progressive one's cost grows with its number of
    scans, and the other formats decode slower per pixel. An unreadable image is not quick: the thread
    pool decodes it and reports the error."""
    if not (max_pixels and max_bytes) or sum(len(data) for data in images) > max_bytes:
        return False
    total = 0
    for data in images:
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
                if image.info.get("progressive"):
                    return False
                total += image.width * image.height
        except Exception:  # only a hint: whatever went wrong is for the thread pool to report
            return False
        if total > max_pixels:
            return False
    return True


def _resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    # Same arithmetic as torchvision's Resize(int): the shorter side becomes `shorter`,
    # the longer one is scaled and truncated.
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


# A large image (REDUCE_MIN_PIXELS or more) more than REDUCING_GAP times the model's size (per side,
# within the crop box) is first shrunk by an integer factor, the mean of each block (Pillow's reduce, as
# Image.resize(reducing_gap=...) does), and only then converted and resized: its full-size conversions
# (alpha compositing, color) cost four times its decoded size in memory. Measured against full resolution
# on photos: about 0.2 levels of 255 off on average, at most 6 (sharp edges). Smaller images, the usual
# training and serving case, get the full-resolution pixels exactly.
REDUCE_MIN_PIXELS = 4_000_000
REDUCING_GAP = 4.0
# Rows converted at a time when an image changes mode before its reduction: about a million pixels each.
BAND_PIXELS = 1 << 20
FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # Pillow's, in output pixels


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _crop_box(size: tuple[int, int], spec: PreprocessSpec) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """The resized size, and the region of the original image the center crop keeps."""
    width, height = size
    new_width, new_height = _resized_size(width, height, spec.resize_size)
    top = int(round((new_height - spec.image_size) / 2.0))
    left = int(round((new_width - spec.image_size) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    return (new_width, new_height), (
        left * scale_x,
        top * scale_y,
        (left + spec.image_size) * scale_x,
        (top + spec.image_size) * scale_y,
    )


def reduction_factor(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """By how much (x, y) an image of `size` is reduced before it is resized: (1, 1) for none."""
    if size[0] * size[1] < REDUCE_MIN_PIXELS:
        return 1, 1
    _, box = _crop_box(size, spec)
    return (
        int((box[2] - box[0]) / spec.image_size / REDUCING_GAP) or 1,
        int((box[3] - box[1]) / spec.image_size / REDUCING_GAP) or 1,
    )


def _on_white(image: Image.Image) -> Image.Image:
    # Composite transparent pixels on white rather than on whatever the hidden color is.
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def _premultiplied_on_white(image: Image.Image) -> Image.Image:
    """RGBa (color premultiplied by alpha) composited on white: color + (255 - alpha). Block means of
    premultiplied pixels composite to the block means of the composited pixels."""
    pixels = np.asarray(image, dtype=np.uint16)
    return Image.fromarray(np.minimum(pixels[:, :, :3] + (255 - pixels[:, :, 3:]), 255).astype(np.uint8))


def _reduced(image: Image.Image, mode: str, factor: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """The region `box` of the image, reduced by `factor`, in `mode` and composited on white. Conversions
    happen band by band, so no full-size converted copy of a large image is ever made."""
    if image.mode == mode:
        return image.reduce(factor, box)
    alpha = _has_alpha(image)
    left, top, right, bottom = box
    factor_x, factor_y = factor
    reduced = Image.new(
        "RGBa" if alpha else mode, (math.ceil((right - left) / factor_x), math.ceil((bottom - top) / factor_y))
    )
    rows = factor_y * max(1, BAND_PIXELS // ((right - left) * factor_y))
    for band_top in range(top, bottom, rows):
        band = image.crop((left, band_top, right, min(band_top + rows, bottom)))
        if alpha:
            band = (band if band.mode == "RGBA" else band.convert("RGBA")).convert("RGBa")
        else:
            band = band.convert(mode)
        reduced.paste(band.reduce(factor), (0, (band_top - top) // factor_y))
    return _premultiplied_on_white(reduced).convert(mode) if alpha else reduced


def to_model_pixels(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Color conversion, resize of the shorter side, center crop and (if the spec asks) equalization.

    A large image is reduced first (see REDUCING_GAP) and converted at that smaller size; any other
    gets exactly the full-resolution conversion and resize."""
    mode = "L" if spec.color_mode == "L" else "RGB"
    resample = INTERPOLATIONS[spec.interpolation]
    output = (spec.image_size, spec.image_size)
    resized, box = _crop_box(image.size, spec)
    factor = reduction_factor(image.size, spec)
    if resized != image.size and factor != (1, 1):
        # Only the crop box, widened by the filter's reach as Pillow's own resize(reducing_gap=...) does.
        reach = FILTER_SUPPORT[spec.interpolation] - 0.5
        reach_x, reach_y = reach * (box[2] - box[0]) / spec.image_size, reach * (box[3] - box[1]) / spec.image_size
        region = (
            max(0, int(box[0] - reach_x)),
            max(0, int(box[1] - reach_y)),
            min(image.width, math.ceil(box[2] + reach_x)),
            min(image.height, math.ceil(box[3] + reach_y)),
        )
        image = _reduced(image, mode, factor, region)
        box = (
            (box[0] - region[0]) / factor[0],
            (box[1] - region[1]) / factor[1],
            (box[2] - region[0]) / factor[0],
            (box[3] - region[1]) / factor[1],
        )
        image = image.resize(output, resample, box=box)
        return ImageOps.equalize(image) if spec.equalize else image
    if image.mode != mode:
        if _has_alpha(image):
            image = _on_white(image)
        image = image.convert(mode)
    if resized == image.size:
        left, top = round(box[0]), round(box[1])
        image = image.crop((left, top, left + spec.image_size, top + spec.image_size))
    else:
        # Resize only the region the center crop keeps: the same filter centers and weights as resizing
        # the whole image and then cropping (pixels equal within rounding), for a fraction of the work.
        image = image.resize(output, resample, box=box)
    return ImageOps.equalize(image) if spec.equalize else image


@lru_cache(maxsize=64)
def _scale_and_offset(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (C x 1 x 1), in float32: (level / 255 - mean) / std == level * scale + offset."""
    mean, std = np.asarray(spec.mean, dtype=np.float64), np.asarray(spec.std, dtype=np.float64)
    scale, offset = 1.0 / (255.0 * std), -mean / std
    return scale.astype(np.float32)[:, None, None], offset.astype(np.float32)[:, None, None]


def normalize(pixels: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """HWC or HW uint8 pixels -> CHW float32, scaled to [0, 1] and normalized, in one multiply and one add.

    With `out` (a C x H x W float32 array, such as one image of a batch), the result is written there.
    """
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize takes 8-bit pixels, not {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.color_mode == "BGR":
        pixels = pixels[:, :, ::-1]
    if pixels.shape[2] != spec.channels:
        raise ValueError(
            f"normalize takes {spec.channels}-channel pixels for color_mode {spec.color_mode}, not {pixels.shape[2]}"
        )
    shape = (pixels.shape[2], pixels.shape[0], pixels.shape[1])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, not {out.dtype} {out.shape}")
    scale, offset = _scale_and_offset(spec)
    # Reading the HWC pixels through a CHW view: twice as fast as a table look-up per channel.
    np.multiply(pixels.transpose(2, 0, 1), scale, out=out, dtype=np.float32)
    return np.add(out, offset, out=out)


def preprocess(image: Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """A decoded image -> the model's CHW float32 input (written into `out` if given)."""
    return normalize(np.asarray(to_model_pixels(image, spec)), spec, out)


def model_pixels(image: Image.Image, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """A decoded image -> H x W x C uint8 in the model's channel order, for a model that normalizes
    its input itself (`builder publish --pixel-input`); written into `out` if given."""
    pixels = np.asarray(to_model_pixels(image, spec))
    pixels = pixels.reshape(*pixels.shape[:2], spec.channels)
    if spec.color_mode == "BGR":
        pixels = pixels[:, :, ::-1]
    if out is None:
        return np.ascontiguousarray(pixels)
    if out.shape != pixels.shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {pixels.shape}, not {out.dtype} {out.shape}")
    out[...] = pixels
    return out


def model_input(
    image: Image.Image, spec: PreprocessSpec, *, pixel_input: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """What the model takes for one image: normalized CHW float32, or HWC uint8 pixels with `pixel_input`."""
    return model_pixels(image, spec, out) if pixel_input else preprocess(image, spec, out)


def batch_layout(size: int, spec: PreprocessSpec, *, pixel_input: bool = False) -> tuple[tuple[int, ...], type]:
    """Shape and dtype of a batch of `size` model inputs."""
    if pixel_input:
        return (size, spec.image_size, spec.image_size, spec.channels), np.uint8
    return (size, *spec.input_shape), np.float32


def input_batch(size: int, spec: PreprocessSpec, *, pixel_input: bool = False) -> np.ndarray:
    """An empty batch of `size` model inputs, to be filled by `model_input(..., out=batch[i])`."""
    return np.empty(*batch_layout(size, spec, pixel_input=pixel_input))


def preprocess_bytes(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int | None = None, pixel_input: bool = False
) -> np.ndarray:
    return model_input(decode_image(data, max_pixels=max_pixels), spec, pixel_input=pixel_input)


def prepare_batch(
    images: list[bytes],
    spec: PreprocessSpec,
    max_pixels: int,
    jpeg_draft: bool = False,
    pixel_input: bool = False,
    out: np.ndarray | None = None,
    *,
    max_request_pixels: int | None = None,
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, float, float]:
    """Decode and preprocess every image (into `out` if given); returns the batch and the seconds spent
    in each stage.

    Every header is read first: a request over `max_pixels` per image or `max_request_pixels` in
    all is refused (413) before any pixel is decoded, and one whose images are large in all holds its
    share of `budget` while they are decoded (429 when the share is taken): many images just under the
    large size cost as much as one large image of their sum."""
    draft_size = spec.resize_size if jpeg_draft else None
    decode_s = preprocess_s = 0.0
    started = time.perf_counter()
    opened: deque[Image.Image] = deque()
    for position, data in enumerate(images):
        try:
            opened.append(open_image(data, max_pixels=max_pixels))
        except ImageTooLargeError as e:
            raise PayloadTooLarge(f"image {position}: {e}") from e
        except InvalidImageError as e:
            raise InvalidImage(f"image {position}: {e}") from e
    sizes = [image.width * image.height for image in opened]
    if max_request_pixels is not None and sum(sizes) > max_request_pixels:
        raise PayloadTooLarge(
            f"the images have {sum(sizes)} pixels in all, more than the limit of {max_request_pixels} per request"
        )
    decode_s += time.perf_counter() - started
    # Each image goes straight into its place in the batch: no stacking copy afterwards.
    batch = input_batch(len(images), spec, pixel_input=pixel_input) if out is None else out
    large = False
    try:
        with budget.hold(sum(sizes)) if budget else nullcontext(False) as large:
            for position in range(len(opened)):
                started = time.perf_counter()
                image = opened.popleft()  # its pixels are freed once it is done
                try:
                    image = load_image(image, draft_size=draft_size)
                except InvalidImageError as e:
                    raise InvalidImage(f"image {position}: {e}") from e
                decoded = time.perf_counter()
                model_input(image, spec, pixel_input=pixel_input, out=batch[position])
                del image
                decode_s += decoded - started
                preprocess_s += time.perf_counter() - decoded
    except DecoderBusyError as e:
        raise TooManyRequests(str(e), retry_after_s=RETRY_AFTER_S) from e
    finally:
        if large:
            release_memory()
    return batch, decode_s, preprocess_s


def encoded_batch(
    images: list[bytes], max_pixels: int, *, max_request_pixels: int | None = None, max_batch_bytes: int | None = None
) -> tuple[np.ndarray, int]:
    """The request to a model that decodes the images itself: N x L uint8, each image's bytes padded with zeros
    to the longest (Triton takes one shape per batch; JPEG, PNG, BMP and WebP decoders stop at their end
    marker or declared size, and the DALI backend's README suggests zero padding). Nothing is decoded here;
    every header is read and checked against the same limits as a decode (413, 400) first. Returns the batch
    and the images' pixels in all.

    `max_batch_bytes`: the most the padded batch may take (images x longest), checked before it is allocated:
    padding makes one large image and many small ones cost the large one's size each (413)."""
    longest = max((len(data) for data in images), default=0)
    if max_batch_bytes is not None and len(images) * longest > max_batch_bytes:
        raise PayloadTooLarge(
            f"{len(images)} images padded to the longest ({longest} bytes) make {len(images) * longest} bytes, "
            f"more than the limit of {max_batch_bytes}: send images of very different sizes in separate requests"
        )
    sizes = []
    for position, data in enumerate(images):
        try:
            with open_image(data, max_pixels=max_pixels, formats=ENCODED_FORMATS) as image:
                sizes.append(image.width * image.height)
        except ImageTooLargeError as e:
            raise PayloadTooLarge(f"image {position}: {e}") from e
        except InvalidImageError as e:
            raise InvalidImage(f"image {position}: {e}") from e
    if max_request_pixels is not None and sum(sizes) > max_request_pixels:
        raise PayloadTooLarge(
            f"the images have {sum(sizes)} pixels in all, more than the limit of {max_request_pixels} per request"
        )
    batch = np.zeros((len(images), longest), dtype=np.uint8)
    for row, data in zip(batch, images):
        row[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return batch, sum(sizes)
