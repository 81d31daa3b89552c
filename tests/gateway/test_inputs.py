"""The three ways to send images (raw, multipart, JSON base64) and the limits on them, in process."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from .conftest import MODEL, client_of, gateway_settings, png, rejections

CLASSIFY = f"/v1/models/{MODEL}/classify"


def test_raw_multipart_and_json_bodies_reach_triton_as_the_same_batch(gateway, replicas):
    images = [png(30), png(200)]
    assert gateway.post(CLASSIFY, content=images[0], headers={"Content-Type": "image/png"}).status_code == 200
    assert gateway.post(CLASSIFY, files=[("image", ("a.png", data, "image/png")) for data in images]).status_code == 200
    assert (
        gateway.post(CLASSIFY, json={"images": [base64.b64encode(data).decode() for data in images]}).status_code == 200
    )
    data_url = "data:image/png;base64," + base64.b64encode(images[1]).decode()
    assert gateway.post(CLASSIFY, json={"images": [data_url]}).status_code == 200
    raw, multipart, json_body, from_url = replicas.batches
    assert raw.shape == (1, 1, 8, 8) and multipart.shape == json_body.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(multipart, json_body)
    np.testing.assert_array_equal(raw[0], multipart[0])
    np.testing.assert_array_equal(from_url[0], multipart[1])
    assert not np.array_equal(multipart[0], multipart[1])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"images": []}, "at least one image"),
        ({"pictures": ["x"]}, "at least one image"),
        ([1, 2], "at least one image"),
        ({"images": [5]}, "must be a base64 string"),
        ({"images": ["not base64!"]}, "not valid base64"),
    ],
    ids=["no images", "wrong key", "not an object", "not a string", "not base64"],
)
def test_json_bodies_that_are_not_images_are_400(gateway, body, message):
    answer = gateway.post(CLASSIFY, json=body)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_a_body_that_is_not_json_is_400(gateway):
    answer = gateway.post(CLASSIFY, content=b"{", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"


def test_multipart_without_an_image_field_is_400(gateway):
    answer = gateway.post(CLASSIFY, files=[("photo", ("a.png", png(), "image/png"))])
    assert answer.status_code == 400 and "no file field named 'image'" in answer.json()["error"]["message"]


def test_limits_on_images_body_and_pixels_are_413():
    settings = gateway_settings(max_images_per_request=2, max_body_bytes=4096, max_image_pixels=100)
    with client_of(settings) as client:
        three = [("image", (f"{i}.png", png(), "image/png")) for i in range(3)]
        for answer in (
            client.post(CLASSIFY, files=three),
            client.post(CLASSIFY, json={"images": [base64.b64encode(png()).decode()] * 3}),
            client.post(CLASSIFY, content=b"\0" * 5000, headers={"Content-Type": "image/png"}),
            client.post(CLASSIFY, content=png(size=(20, 20)), headers={"Content-Type": "image/png"}),
        ):
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"]["code"] == "payload_too_large"
        assert rejections(client, "payload_too_large") == 4


@pytest.mark.parametrize("header", ["Content-Type", "Content-Length", "Content-Encoding"])
def test_a_framing_header_sent_twice_is_400(gateway, header):
    value = {"Content-Type": "image/png", "Content-Length": str(len(png())), "Content-Encoding": "identity"}[header]
    headers = [("Content-Type", "image/png"), (header, value)] if header != "Content-Type" else []
    headers += [(header, value), (header, "image/jpeg" if header == "Content-Type" else value)]
    answer = gateway.post(CLASSIFY, content=png(), headers=headers)
    assert answer.status_code == 400 and "more than once" in answer.json()["error"]["message"]
