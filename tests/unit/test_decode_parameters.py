"""Reduced-scale JPEG decoding per model: what `builder publish` writes into config.pbtxt from the measurement
the ONNX file records, read back as the gateway reads a config from Triton; and GATEWAY_JPEG_DRAFT's three
values over it."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from builder import model_config
from builder.errors import PublishError
from builder.publish import OnnxClassifier, PublishSettings, build_config
from server.preprocess import REDUCED_SCALE_PARAMETER, PreprocessSpec
from server.settings import Settings, SettingsError, load_settings
from server.triton import model_info_from_config

SPEC = PreprocessSpec(8, 8, (0.5,), (0.25,), color_mode="L")


def measured(reduced_scale: bool) -> str:
    return json.dumps(
        {
            "reduced_scale": reduced_scale,
            "exact_top1": 0.8125,
            "reduced_top1": 0.8 if reduced_scale else 0.75,
            "images": 80,
            "jpeg_images": 80,
            "max_accuracy_drop": 1.0,
        }
    )


def served_info(metadata: dict[str, str]):
    """Publish's config for a model with this ONNX metadata, through config.pbtxt and Triton's JSON form."""
    model = OnnxClassifier("input", (1, 8, 8), ("logits",), 10, metadata)
    config = build_config("m", model, SPEC, [str(i) for i in range(10)], PublishSettings())
    text = model_config.render(config)
    as_triton_answers = json_format.MessageToDict(
        model_config.to_protobuf(model_config.parse(text)), preserving_proto_field_name=True
    )
    return config, model_info_from_config("m", as_triton_answers)


@pytest.mark.parametrize("allowed", [True, False])
def test_the_measured_decision_and_both_accuracies_go_from_the_onnx_file_to_the_gateway(allowed):
    config, info = served_info({"decode": measured(allowed)})
    assert config.parameters[REDUCED_SCALE_PARAMETER] == ("true" if allowed else "false")
    assert config.parameters["decode.exact_top1"] == "0.8125"
    assert config.parameters["decode.reduced_top1"] == ("0.8000" if allowed else "0.7500")
    assert info.reduced_scale_decode is allowed


def test_a_model_never_measured_is_decoded_exactly():
    config, info = served_info({})
    assert not any(key.startswith("decode.") for key in config.parameters)
    assert info.reduced_scale_decode is False


@pytest.mark.parametrize("recorded", ["not json", json.dumps({"reduced_scale": "yes"}), json.dumps([1])])
def test_a_malformed_measurement_is_refused_in_one_line(recorded):
    with pytest.raises(PublishError, match="'decode' metadata is malformed"):
        served_info({"decode": recorded})


@pytest.mark.parametrize(
    ("value", "setting", "allowed_model", "other_model"),
    [
        (None, "auto", True, False),  # the default follows the model
        ("auto", "auto", True, False),
        ("off", "off", False, False),
        ("false", "off", False, False),  # the old boolean spellings keep their meaning
        ("0", "off", False, False),
        ("on", "on", True, True),
        ("True", "on", True, True),
        ("1", "on", True, True),
    ],
)
def test_gateway_jpeg_draft_follows_the_model_unless_overridden(
    monkeypatch, value, setting, allowed_model, other_model
):
    if value is None:
        monkeypatch.delenv("GATEWAY_JPEG_DRAFT", raising=False)
    else:
        monkeypatch.setenv("GATEWAY_JPEG_DRAFT", value)
    settings = load_settings(Settings)
    assert settings.jpeg_draft == setting
    assert settings.reduced_scale_decode(True) is allowed_model
    assert settings.reduced_scale_decode(False) is other_model


def test_an_unknown_jpeg_draft_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("GATEWAY_JPEG_DRAFT", "sometimes")
    with pytest.raises(SettingsError, match=r"^GATEWAY_JPEG_DRAFT='sometimes': Input should be 'auto', 'off' or 'on'$"):
        load_settings(Settings)


def test_a_drop_exactly_at_the_budget_is_within_it():
    from builder.evaluate import DecodeComparison

    at_budget = DecodeComparison(exact_top1=0.9, reduced_top1=0.89, images=100, jpeg_images=100, max_accuracy_drop=1.0)
    assert at_budget.reduced_scale and not DecodeComparison(0.9, 0.88, 100, 100, 1.0).reduced_scale
