"""The ensemble `builder publish --preprocess gpu` writes, served by the real Triton behind the gateway, with one
change: its DALI step (this Triton has no DALI backend) is a Python-backend model that decodes the bytes it
gets with the gateway's own preprocessing. The gateway sends the encoded images as they came (zero-padded to
one length), the ensemble's config and the ragged input load in Triton, and every image is classified as
the gateway classifies it for the float model, still refused from its header where it is over the limits."""

from __future__ import annotations

import io
import textwrap

import httpx
import numpy as np
import pytest
from PIL import Image

from builder import model_config
from builder.publish import PublishSettings, publish

from .conftest import start_gateway, start_triton

MODEL = "digits"
ENSEMBLE = "digits-ensemble"
MAX_IMAGE_PIXELS = 64 * 64

# Stands in for the DALI pipeline: the bytes of each request, zero-padded, decoded as the gateway would.
STAND_IN = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    from server.preprocess import PreprocessSpec, preprocess_bytes


    class TritonPythonModel:
        def initialize(self, args):
            import json

            parameters = json.loads(args["model_config"])["parameters"]
            self.spec = PreprocessSpec.from_parameters({k: v["string_value"] for k, v in parameters.items()})

        def execute(self, requests):
            responses = []
            for request in requests:
                encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE_BYTES").as_numpy()
                batch = np.stack([preprocess_bytes(row.tobytes(), self.spec) for row in encoded])
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PREPROCESSED", batch)]))
            return responses
    """
)


@pytest.fixture(scope="module")
def stack(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoded-input")
    repository = folder / "repository"
    publish(
        tiny_run / "model.onnx",
        repository,
        MODEL,
        settings=PublishSettings(preprocess="gpu", instance_count=1, max_batch_size=4, warmup=False),
    )
    stand_in = repository / f"{MODEL}-preprocess"
    config = model_config.parse((stand_in / "config.pbtxt").read_text())
    spec = model_config.parse((repository / MODEL / "config.pbtxt").read_text()).parameters
    (stand_in / "config.pbtxt").write_text(
        model_config.render(
            model_config.ModelConfig(
                **{
                    **{f: getattr(config, f) for f in ("name", "inputs", "outputs", "max_batch_size")},
                    "dynamic_batching": config.dynamic_batching,
                    "backend": "python",
                    "instance_kind": "KIND_CPU",
                    "parameters": spec,
                }
            )
        )
    )
    (stand_in / "1" / "dali.py").unlink()
    (stand_in / "1" / "model.py").write_text(STAND_IN)
    triton = start_triton(repository, folder / "triton-cache")
    gateway = start_gateway(
        triton.grpc_url, folder / "gateway.log", triton.http_url, GATEWAY_MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS)
    )
    try:
        yield triton, gateway
    finally:
        gateway.stop()
        triton.stop()


def _image(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 24 + seed % 5), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _large_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (MAX_IMAGE_PIXELS, 2)).save(buffer, "PNG")  # one pixel row more than the limit allows
    return buffer.getvalue()


def _classify(gateway, model: str, images: list[bytes]) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/models/{model}/classify?top_k=10",
        files=[("image", (f"{i}", image, "application/octet-stream")) for i, image in enumerate(images)],
        timeout=30,
    )


def test_encoded_images_are_classified_as_the_gateway_classifies_them(stack):
    _, gateway = stack
    # Of different lengths (padded in one call), and more than the max batch of 4 (split into two calls).
    images = [_image(seed, fmt) for seed, fmt in enumerate(["PNG", "JPEG", "PNG", "BMP", "JPEG", "WEBP"])]
    assert len({len(image) for image in images}) == len(images)
    encoded = _classify(gateway, ENSEMBLE, images)
    decoded = _classify(gateway, MODEL, images)
    assert encoded.status_code == decoded.status_code == 200, (encoded.text, decoded.text)
    for got, expected in zip(encoded.json()["results"], decoded.json()["results"]):
        got, expected = got["predictions"], expected["predictions"]
        assert [c["label"] for c in got] == [c["label"] for c in expected]
        np.testing.assert_allclose([c["score"] for c in got], [c["score"] for c in expected], atol=1e-5)
    metadata = httpx.get(f"{gateway.url}/v1/models/{ENSEMBLE}", timeout=10).json()
    assert metadata["input_datatype"] == "UINT8"


@pytest.mark.parametrize(
    ("image", "status"),
    [
        (_large_png(), 413),  # over the pixel limit, read from the header
        (_image(2, "GIF"), 400),  # a format DALI's decoder does not read
    ],
)
def test_what_the_header_refuses_never_reaches_triton(stack, image, status):
    _, gateway = stack
    answer = _classify(gateway, ENSEMBLE, [_image(0), image])
    assert answer.status_code == status, answer.text
    assert "image 1" in answer.json()["error"]["message"]
