"""Property-based: whatever arrives, the gateway answers below 500, and every 4xx carries a JSON error."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from server.app import create_app
from server.settings import Settings

from .conftest import MODEL

PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def client(triton):
    settings = Settings(
        triton_grpc_url=triton.grpc_url, triton_http_url=triton.http_url, log_json=False, max_image_pixels=1_000_000
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_clean(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"]


@st.composite
def images(draw) -> bytes:
    mode = draw(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16"]))
    width, height = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    image = Image.new(mode, (width, height), draw(st.integers(0, 255)))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # that mode cannot be written in that format
        image.convert("RGB").save(buffer, fmt)
    data = buffer.getvalue()
    cut = draw(st.integers(0, len(data)))
    return data if draw(st.booleans()) else data[:cut]


@PROPERTY_SETTINGS
@given(
    body=st.binary(max_size=2048),
    content_type=st.sampled_from(
        [
            "image/png",
            "image/jpeg",
            "application/octet-stream",
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=xyz",
            "text/plain",
            "",
        ]
    ),
)
def test_random_bytes_never_cause_a_5xx(client, body, content_type):
    assert_clean(client.post(f"/v1/models/{MODEL}/classify", content=body, headers={"Content-Type": content_type}))


@PROPERTY_SETTINGS
@given(data=images())
def test_random_images_of_any_size_and_mode_never_cause_a_5xx(client, data):
    response = client.post(f"/v1/models/{MODEL}/classify", content=data, headers={"Content-Type": "image/png"})
    assert_clean(response)


@PROPERTY_SETTINGS
@given(
    parts=st.lists(st.tuples(st.sampled_from(["image", "other", ""]), st.binary(max_size=512)), max_size=6),
    top_k=st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=5)),
)
def test_random_multipart_shapes_and_query_values_never_cause_a_5xx(client, parts, top_k):
    files = [
        (name or "image", (f"f{i}", payload, "application/octet-stream")) for i, (name, payload) in enumerate(parts)
    ]
    response = client.post(
        f"/v1/models/{MODEL}/classify", params={"top_k": top_k}, files=files or None, data=None if files else {"x": "y"}
    )
    assert_clean(response)
