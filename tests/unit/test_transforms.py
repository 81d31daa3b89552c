"""The training eval transform, checked against the gateway's preprocessing it must equal."""

import numpy as np
import pytest

from builder.data import load_dataset, resolve_spec


@pytest.mark.parametrize("source", ["digits", "shapes:per_class=4,size=20"])
@pytest.mark.parametrize("equalize", [False, True])
def test_gateway_preprocessing_equals_the_training_eval_transform(source, equalize):
    from builder.transforms import eval_transform
    from server.preprocess import PreprocessSpec, preprocess

    dataset = load_dataset(source)
    spec = resolve_spec(dataset, image_size=16, equalize=equalize)
    # Through the gateway's own spec transport: Triton's string parameters.
    served = PreprocessSpec.from_parameters(spec.to_parameters())
    assert served == spec and served.equalize is equalize
    transform = eval_transform(spec)
    for image in dataset.val.images[:8]:
        expected = preprocess(image, served)
        assert expected.shape == spec.input_shape
        np.testing.assert_array_equal(transform(image).numpy(), expected)
