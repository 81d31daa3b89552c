"""What the gateway reads from a model's config, and how it answers Triton's refusals."""

import pytest
from tritonclient.utils import InferenceServerException

from server.errors import BadRequest, ModelNotFound, TritonFailed
from server.preprocess import PreprocessSpec
from server.triton import model_info_from_config, translate_error


def _config(max_batch_size: int, dims: list) -> dict:
    parameters = {key: {"string_value": value}
                  for key, value in PreprocessSpec(8, 8, (0.5,), (0.5,), color_mode="L").to_parameters().items()}
    return {"max_batch_size": max_batch_size, "parameters": parameters,
            "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": dims}],
            "output": [{"name": "logits", "dims": ["10"]}]}


@pytest.mark.parametrize(("max_batch_size", "dims", "per_call"), [
    (32, ["1", "8", "8"], 32),
    (0, ["1", "1", "8", "8"], 1),       # a fixed batch of 1: one image per call (gRPC's JSON has strings)
    (0, [1, 1, 8, 8], 1),               # HTTP's has numbers
    (0, ["-1", "1", "8", "8"], None),   # no batching but a dynamic first axis: all at once
])
def test_images_per_call_follow_the_batch_axis(max_batch_size, dims, per_call):
    assert model_info_from_config("m", _config(max_batch_size, dims)).images_per_call == per_call


@pytest.mark.parametrize(("status", "message", "error"), [
    ("StatusCode.INVALID_ARGUMENT", "input of shape [2, 1, 8, 8], the model takes [1, 1, 8, 8]", BadRequest),
    ("400", "unexpected shape for input 'input' for model 'm'", BadRequest),
    ("400", "Request for unknown model: 'm' is not found", ModelNotFound),
    ("StatusCode.INTERNAL", "inference failed: out of memory", TritonFailed),
])
def test_a_refused_input_is_the_clients_error_and_a_failure_is_tritons(status, message, error):
    translated = translate_error(InferenceServerException(message, status=status), "m")
    assert type(translated) is error
    assert translated.status == {BadRequest: 400, ModelNotFound: 404, TritonFailed: 502}[error]
