import pytest

from builder import model_config as mc


def sample_config(**overrides) -> mc.ModelConfig:
    values = dict(
        name="digits",
        inputs=(mc.TensorSpec("input", (1, 32, 32)),),
        outputs=(mc.TensorSpec("logits", (10,), label_filename="labels.txt"),),
        max_batch_size=16,
        dynamic_batching=mc.DynamicBatching(preferred_batch_sizes=(4, 8), max_queue_delay_us=500,
                                            max_queue_size=32),
        instance_count=2,
        parameters={"preprocess.image_size": "32", "labels": '["a", "b"]'},
    )
    return mc.ModelConfig(**{**values, **overrides})


def test_render_then_parse_gives_back_the_same_config():
    config = sample_config()
    assert mc.parse(mc.render(config)) == config


def test_rendered_config_has_the_sections_triton_reads():
    text = mc.render(sample_config())
    for fragment in ('backend: "python"', "max_batch_size: 16", "max_queue_delay_microseconds: 500",
                     "max_queue_size: 32", "kind: KIND_CPU", "count: 2", 'label_filename: "labels.txt"',
                     "num_versions: 1"):
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
