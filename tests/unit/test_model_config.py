import pytest

from builder import model_config as mc


def sample_config(**overrides) -> mc.ModelConfig:
    values = dict(
        name="digits",
        inputs=(mc.TensorSpec("input", (1, 32, 32)),),
        outputs=(mc.TensorSpec("logits", (10,), label_filename="labels.txt"),),
        max_batch_size=16,
        dynamic_batching=mc.DynamicBatching(preferred_batch_sizes=(4, 8), max_queue_delay_us=500, max_queue_size=32),
        instance_count=2,
        parameters={"preprocess.image_size": "32", "labels": '["a", "b"]'},
    )
    return mc.ModelConfig(**{**values, **overrides})


def test_render_then_parse_gives_back_the_same_config():
    config = sample_config()
    assert mc.parse(mc.render(config)) == config


def test_rendered_config_has_the_sections_triton_reads():
    text = mc.render(sample_config())
    for fragment in (
        'backend: "python"',
        "max_batch_size: 16",
        "max_queue_delay_microseconds: 500",
        "max_queue_size: 32",
        "kind: KIND_CPU",
        "count: 2",
        'label_filename: "labels.txt"',
        "num_versions: 1",
    ):
        assert fragment in text


def test_config_without_dynamic_batching_round_trips():
    config = sample_config(dynamic_batching=None)
    parsed = mc.parse(mc.render(config))
    assert parsed.dynamic_batching is None
    assert "dynamic_batching" not in mc.render(config)


def test_preferred_batch_size_above_max_batch_size_is_rejected():
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        sample_config(max_batch_size=4)


def test_dynamic_batching_needs_batching_enabled():
    with pytest.raises(ValueError, match="max_batch_size > 0"):
        sample_config(max_batch_size=0)


def test_a_model_without_batching_keeps_the_bounded_queue():
    config = sample_config(
        max_batch_size=0,
        inputs=(mc.TensorSpec("input", (1, 1, 32, 32)),),
        dynamic_batching=mc.DynamicBatching(preferred_batch_sizes=(), max_queue_delay_us=0),
    )
    assert mc.parse(mc.render(config)) == config
    assert "max_queue_size: 64" in mc.render(config)


def test_gpu_onnx_runtime_config_with_tensorrt_accelerator_round_trips():
    accelerator = mc.ExecutionAccelerator(
        "tensorrt",
        {"precision_mode": "FP16", "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/cache/digits"},
    )
    config = sample_config(
        backend="onnxruntime", platform="onnxruntime_onnx", instance_kind="KIND_GPU", gpu_accelerators=(accelerator,)
    )
    text = mc.render(config)
    assert mc.parse(text) == config
    for fragment in (
        'platform: "onnxruntime_onnx"',
        "gpu_execution_accelerator",
        'name: "tensorrt"',
        'key: "precision_mode"',
        'value: "FP16"',
        "kind: KIND_GPU",
    ):
        assert fragment in text


@pytest.mark.parametrize(
    "policy, extra, fragment",
    [
        ("all", {}, "all {"),
        ("specific", {"specific_versions": (2, 3)}, "versions: 2"),
        ("latest", {"latest_versions": 2}, "num_versions: 2"),
    ],
)
def test_version_policies_round_trip(policy, extra, fragment):
    config = sample_config(version_policy=policy, **extra)
    assert fragment in mc.render(config)
    assert mc.parse(mc.render(config)) == config


def test_cuda_graphs_round_trip():
    config = sample_config(backend="tensorrt", platform="tensorrt_plan", cuda_graphs=True)
    assert "graphs: true" in mc.render(config) and mc.parse(mc.render(config)).cuda_graphs


def test_unknown_version_policy_is_rejected():
    with pytest.raises(ValueError, match="latest, all, specific"):
        sample_config(version_policy="newest")


def test_warmup_samples_round_trip_with_file_and_synthetic_inputs():
    from_file = mc.WarmupInput("FP32", (1, 32, 32), data_file="image.raw")
    zeros = mc.WarmupInput("UINT8", (32, 32, 1), synthetic="random_data")
    config = sample_config(
        warmup=(
            mc.WarmupSample("image0_batch1", 1, {"input": from_file}),
            mc.WarmupSample("image0_batch8", 8, {"input": zeros}),
        )
    )
    text = mc.render(config)
    assert 'input_data_file: "image.raw"' in text and "random_data: true" in text and "batch_size: 8" in text
    assert mc.parse(text) == config


def test_a_warmup_batch_the_model_cannot_take_is_rejected():
    sample = mc.WarmupSample("big", 32, {"input": mc.WarmupInput("FP32", (1, 32, 32))})
    with pytest.raises(ValueError, match="batch 32 outside 1..max batch"):
        sample_config(warmup=(sample,))
