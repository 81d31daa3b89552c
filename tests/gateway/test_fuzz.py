"""Property-based fuzzing of what reads untrusted bytes in the gateway: the image decoders (corrupt and
truncated files of every format, headers that declare huge sizes), the KServe v2 body checks, and the
request bodies of both APIs in process. Whatever comes in is answered (a result or a 4xx GatewayError),
never an unexpected exception, which the app would turn into a 500."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import zlib
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.errors import GatewayError
from server.kserve import checked_inference_header, json_header_of
from server.preprocess import DecodeBudget, PreprocessSpec, prepare_batch

from .conftest import MODEL, client_of, gateway_settings

# Pillow warns on opening a header that declares between its pixel limit and twice that; refused all the same.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_PIXELS = 1_000_000
GRAY = PreprocessSpec(image_size=8, resize_size=8, mean=(0.5,), std=(0.25,), color_mode="L")
COLOR = PreprocessSpec(image_size=16, resize_size=20, mean=(0.5,) * 3, std=(0.25,) * 3, color_mode="BGR")
FORMATS = ("PNG", "JPEG", "progressive JPEG", "WEBP", "GIF", "BMP", "TIFF")
MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F")


@cache
def encoded(fmt: str, mode: str, width: int, height: int) -> bytes:
    image = Image.new(mode, (width, height), 77)
    if mode in ("RGB", "RGBA"):
        image.putpixel((0, 0), (255, 0, 0, 128)[: len(mode)])
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation to apply: the EXIF rewrite runs too
    options = {"progressive": True} if fmt == "progressive JPEG" else {}
    buffer = io.BytesIO()
    name = fmt.split()[-1]
    try:
        image.save(buffer, name, exif=exif.tobytes(), **options)
    except (OSError, ValueError, KeyError, TypeError):  # that mode or EXIF cannot be written in that format
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, name, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def corrupt_images(draw) -> bytes:
    """A small valid image of some format and mode, then cut, overwritten, grown, or given odd numbers
    where its header keeps sizes and counts."""
    data = bytearray(encoded(draw(st.sampled_from(FORMATS)), draw(st.sampled_from(MODES)), draw(st.integers(1, 24)), 7))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, max(0, min(len(data) - 1, draw(st.sampled_from([32, 160, 1 << 20]))))))
        edit = draw(st.sampled_from(["byte", "cut", "insert", "u16", "u32"]))
        if edit == "byte" and data:
            data[position] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[position:]
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "u16":
            data[position : position + 2] = struct.pack(">H", draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF])))
        else:
            number = draw(st.sampled_from([0, 1, 1 << 16, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[position : position + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), number)
    return bytes(data)


SIDES = st.sampled_from([0, 1, 3, 999, 1001, 65535, 40_000, 0x7FFFFFFF, 0xFFFFFFFF])


@st.composite
def declared_headers(draw) -> bytes:
    """Well-formed headers (PNG with right CRCs, GIF, BMP, baseline JPEG) that declare any size, with few or
    no pixels behind them."""
    width, height = draw(SIDES), draw(SIDES)
    fmt = draw(st.sampled_from(["PNG", "GIF", "BMP", "JPEG"]))
    tail = draw(st.sampled_from([b"", zlib.compress(b"\0" * 4096), bytes(64)]))
    if fmt == "PNG":
        depth, color = draw(st.sampled_from([(8, 2), (8, 6), (1, 0), (16, 2), (8, 3), (4, 3)]))
        ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, draw(st.sampled_from([0, 1])))
        body = _png_chunk(b"IHDR", ihdr)
        if color == 3:
            body += _png_chunk(b"PLTE", bytes(3 * draw(st.integers(0, 300))))
        return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IDAT", tail) + _png_chunk(b"IEND", b"")
    if fmt == "GIF":
        side = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        image = b"\x2c\0\0\0\0" + side + b"\0\x02" + bytes([len(tail) % 256]) + tail[:255] + b"\0"
        return b"GIF89a" + side + b"\x80\0\0" + bytes(6) + image + b"\x3b"
    if fmt == "BMP":
        signed = (width if width < 1 << 31 else width - (1 << 32), height if height < 1 << 31 else -1)
        bits = draw(st.sampled_from([1, 8, 24, 32]))
        info = struct.pack("<IiiHHIIiiII", 40, *signed, 1, bits, 0, len(tail), 0, 0, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + 40 + len(tail), 0, 0, 54) + info + tail
    frame = struct.pack(">BHHB", 8, height & 0xFFFF, width & 0xFFFF, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", 2 + len(frame)) + frame + tail + b"\xff\xd9"


def assert_answered(images: list[bytes], spec: PreprocessSpec, pixel_input: bool, draft: bool) -> int | None:
    """Decoding ends in a batch (None) or a 4xx GatewayError (its status); anything else fails the test."""
    budget = DecodeBudget(pixels=4 * MAX_PIXELS, large_image_pixels=MAX_PIXELS // 2, decodes=1)
    try:
        prepare_batch(images, spec, MAX_PIXELS, draft, pixel_input, max_request_pixels=2 * MAX_PIXELS, budget=budget)
    except GatewayError as e:
        assert 400 <= e.status < 500, e
        return e.status
    return None


@FUZZ
@given(
    images=st.lists(st.one_of(corrupt_images(), st.binary(max_size=256)), min_size=1, max_size=3),
    spec=st.sampled_from([GRAY, COLOR]),
    pixel_input=st.booleans(),
    draft=st.booleans(),
)
def test_corrupt_and_truncated_images_are_refused_with_a_4xx(images, spec, pixel_input, draft):
    assert_answered(images, spec, pixel_input, draft)


@FUZZ
@given(data=declared_headers(), spec=st.sampled_from([GRAY, COLOR]), pixel_input=st.booleans())
def test_headers_that_declare_huge_sizes_are_refused_before_their_pixels_are_decoded(data, spec, pixel_input):
    status = assert_answered([data], spec, pixel_input, draft=False)
    try:
        with Image.open(io.BytesIO(data)) as image:
            declared = image.width * image.height
    except Exception:  # noqa: BLE001 - a header Pillow cannot read at all: refused as not an image
        declared = 0
    if declared > MAX_PIXELS:
        assert status == 413


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@st.composite
def inference_headers(draw) -> bytes:
    """KServe v2 request headers: near-valid ones with odd values, any JSON, or any bytes."""
    tensor = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.one_of(st.just("input"), JSON_VALUES),
                "datatype": st.one_of(st.sampled_from(["FP32", "UINT8", "BYTES"]), JSON_VALUES),
                "shape": st.one_of(st.lists(st.integers(-2, 1 << 40), max_size=5), JSON_VALUES),
                "data": st.one_of(st.lists(st.floats(), max_size=70), st.lists(st.lists(st.integers())), JSON_VALUES),
                "parameters": st.one_of(st.dictionaries(st.sampled_from(["shared_memory_region", "x"]), JSON_VALUES)),
            },
        )
    )
    document = draw(
        st.one_of(
            st.fixed_dictionaries({"inputs": st.lists(st.just(tensor), max_size=2)}, optional={"outputs": JSON_VALUES}),
            st.dictionaries(st.sampled_from(["inputs", "outputs", "parameters", "id"]), JSON_VALUES),
            JSON_VALUES,
        )
    )
    text = json.dumps(document)
    return draw(
        st.one_of(
            st.just(text.encode()),
            st.just(text.encode("utf-16")),
            st.just(text[: draw(st.integers(0, len(text)))].encode()),
            st.binary(max_size=128),
            st.just(b'{"a": "\\ud800", "inputs": []}'),
            st.just(b'{"inputs": [], "inputs": [1]}'),
        )
    )


@FUZZ
@given(body=inference_headers(), binary_tail=st.binary(max_size=16), length=st.none() | st.text(max_size=6))
def test_kserve_inference_headers_are_read_or_refused_with_a_400(body, binary_tail, length):
    headers = {} if length is None else {"inference-header-content-length": length}
    try:
        if length is not None and not (length.isascii() and length.isdigit()):
            return  # refused earlier, as a header (forwarded_headers)
        parsed = checked_inference_header(json_header_of(body + binary_tail, headers))
    except GatewayError as e:
        assert e.status == 400, e
        return
    assert isinstance(parsed, dict)


CLASSIFY = f"/v1/models/{MODEL}/classify"


@pytest.fixture(scope="module")
def app_client():
    with client_of(gateway_settings(max_image_pixels=MAX_PIXELS), raise_server_exceptions=False) as client:
        yield client


def assert_gateway_error(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"], response.text


@FUZZ
@given(
    images=st.one_of(
        st.lists(st.one_of(corrupt_images().map(lambda d: base64.b64encode(d).decode()), JSON_VALUES), max_size=3),
        JSON_VALUES,
    ),
    extra=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2),
    top_k=st.none() | st.text(max_size=4) | st.integers(-3, 2000).map(str),
)
def test_odd_json_classify_bodies_are_answered_below_500(app_client, images, extra, top_k):
    params = {} if top_k is None else {"top_k": top_k}
    # Encoded here: NaN and Infinity go out as Python writes them, which its parser in the gateway reads.
    body = json.dumps({**extra, "images": images}).encode()
    response = app_client.post(CLASSIFY, content=body, params=params, headers={"Content-Type": "application/json"})
    assert_gateway_error(response)


@FUZZ
@given(
    body=st.one_of(corrupt_images(), declared_headers(), st.binary(max_size=512)),
    media_type=st.sampled_from(
        [
            "image/png",
            "image/webp",
            "image/gif",
            "application/octet-stream",
            "multipart/form-data; boundary=b",
            "multipart/form-data",
            "application/json",
            "application/json; charset=utf-16",
            "image/tiff",
            "",
        ]
    ),
    encoding=st.none() | st.sampled_from(["gzip", "deflate", "br", "GZIP", "identity"]),
    compress=st.booleans(),
)
def test_any_bytes_under_any_framing_are_answered_below_500(app_client, body, media_type, encoding, compress):
    headers = {"Content-Type": media_type} if media_type else {}
    if encoding:
        headers["Content-Encoding"] = encoding
        body = gzip.compress(body) if compress else body
    assert_gateway_error(app_client.post(CLASSIFY, content=body, headers=headers))
    answer = app_client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    # Nothing reaches for Triton (unreachable here, 503) unless its body passed every check first.
    assert answer.status_code < 500 or answer.json() == {"error": "Triton is unreachable"}, answer.text
