"""Reduced-scale JPEG decoding per model: the gateway decodes a large JPEG at reduced scale for a model whose
config allows it (`decode.reduced_scale`) and exactly for one whose config does not, unless GATEWAY_JPEG_DRAFT
says off or on. Told apart by the batch the model is handed, against the real preprocessing both ways."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import skimage
from PIL import Image

from server.errors import ModelNotFound
from server.preprocess import PreprocessSpec, decode_image, preprocess
from server.triton import ModelInfo

from .conftest import INFO, ServedReplicas, client_of, gateway_settings

SPEC = PreprocessSpec(image_size=32, resize_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
MODELS = {
    "allows": dataclasses.replace(INFO, name="allows", spec=SPEC, reduced_scale_decode=True),
    "exact": dataclasses.replace(INFO, name="exact", spec=SPEC, reduced_scale_decode=False),
}


class TwoModels(ServedReplicas):
    async def model_info(self, name: str) -> ModelInfo:
        if name not in MODELS:
            raise ModelNotFound(f"model {name!r} is not served")
        return MODELS[name]


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    """A 1600-pixel photo: libjpeg decodes it at 1/8 scale (200 pixels) for a 40-pixel resize."""
    photo = Image.fromarray(skimage.data.astronaut()).resize((1600, 1600), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize(
    ("jpeg_draft", "reduced"),
    [
        ("auto", {"allows": True, "exact": False}),
        ("off", {"allows": False, "exact": False}),
        ("on", {"allows": True, "exact": True}),
    ],
)
def test_a_model_is_decoded_at_reduced_scale_only_where_its_config_or_the_override_allows(
    large_jpeg, jpeg_draft, reduced
):
    exact = preprocess(decode_image(large_jpeg), SPEC)
    drafted = preprocess(decode_image(large_jpeg, draft_size=SPEC.resize_size), SPEC)
    assert not np.array_equal(exact, drafted)  # the two decodes are told apart
    replicas = TwoModels()
    with client_of(gateway_settings(jpeg_draft=jpeg_draft), replicas) as client:
        for name in MODELS:
            answer = client.post(
                f"/v1/models/{name}/classify", content=large_jpeg, headers={"Content-Type": "image/jpeg"}
            )
            assert answer.status_code == 200, answer.text
    for name, batch in zip(MODELS, replicas.batches):
        np.testing.assert_array_equal(batch[0], drafted if reduced[name] else exact, err_msg=name)
