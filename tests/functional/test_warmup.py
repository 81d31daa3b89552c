"""Published versions are warmed by the real Triton before they report READY: with validation images written
beside the config where the model names its dataset, with synthetic data where it does not."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from builder.data import load_dataset
from builder.publish import PublishSettings, publish
from server.preprocess import PreprocessSpec, model_input
from tests.onnx_variants import with_metadata

from .conftest import start_triton


def _warmed(log: str, model: str) -> set[str]:
    """The warmup samples Triton's verbose log says it ran for `model`."""
    marker = "is running warmup sample '"
    return {
        line.split(marker)[1].split("'")[0]
        for line in log.splitlines()
        if f"model '{model}'" in line and marker in line
    }


def test_versions_are_warm_before_ready_and_then_answer(tiny_run, tmp_path):
    repository = tmp_path / "repo"
    publish(
        tiny_run / "model.onnx",
        repository,
        "digits",
        settings=PublishSettings(preferred_batch_sizes=(2, 4), instance_count=1),
    )
    # Exported elsewhere, with no dataset to take images from: random pixels.
    elsewhere = with_metadata(tiny_run / "model.onnx", tmp_path / "elsewhere.onnx", dataset=None)
    publish(elsewhere, repository, "pixels", settings=PublishSettings(pixel_input=True, instance_count=1))
    triton = start_triton(repository, tmp_path / "cache", extra_args=("--log-verbose=1",))
    try:
        image = load_dataset("digits").val.image(0, "L")
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            for name, pixels in (("digits", False), ("pixels", True)):
                assert client.is_model_ready(name, "1")
                spec = PreprocessSpec.from_parameters(
                    {k: v.string_value for k, v in client.get_model_config(name).config.parameters.items()}
                )
                batch = model_input(image, spec, pixel_input=pixels)[np.newaxis]
                tensor = grpcclient.InferInput("input", list(batch.shape), "UINT8" if pixels else "FP32")
                tensor.set_data_from_numpy(batch)
                logits = client.infer(name, [tensor]).as_numpy("logits")
                assert logits.shape == (1, 10) and np.isfinite(logits).all()
        log = triton.log_path.read_text()
        assert _warmed(log, "digits") == {"image0_batch1", "image1_batch1", "image2_batch1", "image0_batch4"}
        # The CPU target forms batches without preferred sizes: batch 1 alone.
        assert _warmed(log, "pixels") == {"image0_batch1"}
        assert "failed to run warmup sample" not in log
    finally:
        triton.stop()
