"""Graceful degradation: the threshold logic the gateway applies, the setting written into config.pbtxt by
`builder degrade`, its refusals, and what the gateway reads back from Triton's model-config API."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from builder import degrade, model_config
from builder.cli import main
from server.degrade import Degrade, ModelsInFlight, answer_fields
from server.errors import TooManyRequests
from server.preprocess import PreprocessSpec
from server.triton import model_info_from_config
from tests.onnx_variants import conv_classifier

SLOW, FAST = "digits-fp32", "digits-int8"
SPEC = PreprocessSpec(image_size=4, resize_size=4, mean=(0.5,), std=(0.25,), color_mode="L")
SETTING = Degrade(to=FAST, in_flight=2, to_in_flight=3)


# The threshold logic


def _in_flight(**counts: int) -> ModelsInFlight:
    models = ModelsInFlight()
    for name, count in counts.items():
        models.counts[name.replace("_", "-")] = count
    return models


def test_below_its_threshold_a_model_answers_its_own_requests() -> None:
    assert _in_flight(digits_fp32=1).answerer(SLOW, SETTING, pinned=False) == SLOW
    assert _in_flight().answerer(SLOW, SETTING, pinned=False) == SLOW


def test_at_its_threshold_the_next_request_goes_to_the_faster_model() -> None:
    assert _in_flight(digits_fp32=2).answerer(SLOW, SETTING, pinned=False) == FAST
    assert _in_flight(digits_fp32=9, digits_int8=2).answerer(SLOW, SETTING, pinned=False) == FAST


def test_with_the_faster_model_at_its_own_limit_too_the_request_is_refused_with_429() -> None:
    with pytest.raises(TooManyRequests, match="at capacity"):
        _in_flight(digits_fp32=2, digits_int8=3).answerer(SLOW, SETTING, pinned=False)


def test_a_pinned_version_and_a_model_without_the_setting_are_never_degraded() -> None:
    assert _in_flight(digits_fp32=50).answerer(SLOW, SETTING, pinned=True) == SLOW
    assert _in_flight(digits_fp32=50).answerer(SLOW, None, pinned=False) == SLOW


def test_a_release_brings_the_count_back_below_the_threshold() -> None:
    models = _in_flight(digits_fp32=2)
    models.release(SLOW)
    assert models.answerer(SLOW, SETTING, pinned=False) == SLOW
    models.release(SLOW)
    assert SLOW not in models.counts  # a model no longer in flight leaves no entry behind


# The setting in the config, as the gateway reads it from Triton


def _config(name: str, spec: PreprocessSpec = SPEC, labels: tuple[str, ...] = ("a", "b"), **overrides):
    return model_config.ModelConfig(
        name=name,
        inputs=(model_config.TensorSpec("input", (1, 4, 4)),),
        outputs=(model_config.TensorSpec("logits", (2,), label_filename="labels.txt"),),
        parameters={**spec.to_parameters(), "labels": json.dumps(list(labels))},
        **overrides,
    )


def _triton_json(config: model_config.ModelConfig) -> dict:
    return {
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 4, 4]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [2]}],
        "max_batch_size": 32,
        "parameters": {k: {"string_value": v} for k, v in config.parameters.items()},
    }


def test_the_gateway_reads_the_setting_from_the_config_triton_returns() -> None:
    config = degrade.with_degrade(_config(SLOW), Degrade(FAST, 4, 6, 0.28))
    assert model_info_from_config(SLOW, _triton_json(config)).degrade == Degrade(FAST, 4, 6, 0.28)
    assert model_info_from_config(SLOW, _triton_json(_config(SLOW))).degrade is None
    # One the gateway cannot follow (edited by hand) is ignored: the model answers on its own.
    broken = _triton_json(config)
    broken["parameters"]["degrade.in_flight"] = {"string_value": "0"}
    assert model_info_from_config(SLOW, broken).degrade is None
    itself = _triton_json(degrade.with_degrade(_config(SLOW), Degrade(SLOW, 4, 4)))
    assert model_info_from_config(SLOW, itself).degrade is None


def test_a_degraded_answer_names_the_model_that_answered() -> None:
    fast = model_info_from_config(FAST, _triton_json(_config(FAST)))
    slow = model_info_from_config(SLOW, _triton_json(_config(SLOW)))
    assert answer_fields(SLOW, fast, "3") == {"degraded": True, "answered_by": {"model": FAST, "version": "3"}}
    assert answer_fields(SLOW, slow, "1") == {}


# builder degrade


def _repository(tmp_path: Path, fast_spec: PreprocessSpec = SPEC, fast_labels=("a", "b")) -> Path:
    """Both models as publish leaves them: a version folder with its build.json, and one config."""
    repository = tmp_path / "repo"
    for name, config, accuracy in (
        (SLOW, _config(SLOW), 0.9972),
        (FAST, _config(FAST, fast_spec, fast_labels), 0.9944),
    ):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "build.json").write_text(json.dumps({"val_accuracy": accuracy}))
        (repository / name / "config.pbtxt").write_text(model_config.render(config))
    return repository


def _parameters(repository: Path, name: str = SLOW) -> dict[str, str]:
    return dict(model_config.parse((repository / name / "config.pbtxt").read_text()).parameters)


def test_the_faster_model_may_batch_differently(tmp_path) -> None:
    repository = _repository(tmp_path)
    smaller = _config(FAST, max_batch_size=2, dynamic_batching=model_config.DynamicBatching((2,), 100, 4))
    (repository / FAST / "config.pbtxt").write_text(model_config.render(smaller))
    assert degrade.enable(repository, SLOW, FAST, in_flight=2).to == FAST


def test_degrade_is_written_with_the_accuracy_cost_and_cleared(tmp_path, capsys) -> None:
    repository = _repository(tmp_path)
    assert main(["degrade", SLOW, "--to", FAST, "--in-flight", "4", "--repository", str(repository)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["degrade"] == {"to": FAST, "in_flight": 4, "to_in_flight": 4, "accuracy_cost": 0.28}
    parameters = _parameters(repository)
    assert parameters["degrade.to"] == FAST and parameters["degrade.accuracy_cost"] == "0.28"
    assert parameters["preprocess.image_size"] == "4"  # the rest of the config is kept
    assert main(["degrade", SLOW, "--off", "--repository", str(repository)]) == 0
    assert json.loads(capsys.readouterr().out)["degrade"] is None
    assert not [k for k in _parameters(repository) if k.startswith("degrade.")]


def _refused(capsys, *argv: str) -> str:
    try:
        code = main(["degrade", *argv])
    except SystemExit as e:  # a flag argparse refuses
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "fast_spec", "fast_labels", "message"),
    [
        (["elsewhere", "--to", FAST, "--in-flight", "2"], SPEC, ("a", "b"), "not in repository"),
        ([SLOW, "--to", "elsewhere", "--in-flight", "2"], SPEC, ("a", "b"), "not in repository"),
        ([SLOW, "--to", SLOW, "--in-flight", "2"], SPEC, ("a", "b"), "itself"),
        ([SLOW, "--to", f"../repo/{FAST}", "--in-flight", "2"], SPEC, ("a", "b"), "not a model name"),
        ([SLOW, "--to", FAST, "--in-flight", "0"], SPEC, ("a", "b"), "must be"),
        ([SLOW, "--to", FAST, "--in-flight", "-3"], SPEC, ("a", "b"), "must be"),
        ([SLOW, "--to", FAST, "--in-flight", "2", "--to-in-flight", "0"], SPEC, ("a", "b"), "must be"),
        ([SLOW, "--to", FAST], SPEC, ("a", "b"), "needs --in-flight"),
        ([SLOW, "--in-flight", "2"], SPEC, ("a", "b"), "go with --to"),
        ([SLOW, "--off", "--to", FAST], SPEC, ("a", "b"), "--off takes no other option"),
        (
            [SLOW, "--to", FAST, "--in-flight", "2"],
            PreprocessSpec(image_size=4, resize_size=4, mean=(0.4,), std=(0.25,), color_mode="L"),
            ("a", "b"),
            "other preprocessing",
        ),
        ([SLOW, "--to", FAST, "--in-flight", "2"], SPEC, ("b", "a"), "other preprocessing, labels"),
    ],
)
def test_bad_degrade_commands_leave_the_repository_unchanged(
    tmp_path, capsys, argv, fast_spec, fast_labels, message
) -> None:
    repository = _repository(tmp_path, fast_spec, fast_labels)
    before = {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()}
    assert message in _refused(capsys, *argv, "--repository", str(repository))
    assert {p: p.read_bytes() for p in repository.rglob("*") if p.is_file()} == before


def test_unreadable_degrade_values_are_cleared_by_off_and_a_nan_cost_prints_null(tmp_path, capsys) -> None:
    repository = _repository(tmp_path)
    degrade.enable(repository, SLOW, FAST, in_flight=2)
    config = model_config.parse((repository / SLOW / "config.pbtxt").read_text())
    parameters = {**config.parameters, "degrade.accuracy_cost": "nan"}
    model_config.write_config(repository / SLOW, dataclasses.replace(config, parameters=parameters))
    assert main(["degrade", SLOW, "--repository", str(repository)]) == 0
    assert '"accuracy_cost": null' in capsys.readouterr().out
    parameters["degrade.in_flight"] = "many"
    model_config.write_config(repository / SLOW, dataclasses.replace(config, parameters=parameters))
    assert main(["degrade", SLOW, "--off", "--repository", str(repository)]) == 0
    assert json.loads(capsys.readouterr().out)["degrade"] is None
    assert not [k for k in _parameters(repository) if k.startswith("degrade.")]


def test_a_new_version_keeps_the_models_degrade_setting(tmp_path, capsys) -> None:
    repository = _repository(tmp_path)
    onnx_path = conv_classifier(tmp_path / "model.onnx")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    flags = ["--resize", "4", "--crop", "4", "--color-mode", "L", "--mean", "0.5", "--std", "0.25"]
    assert main(["degrade", SLOW, "--to", FAST, "--in-flight", "3", "--repository", str(repository)]) == 0
    published = main(
        ["publish", "--onnx", str(onnx_path), "--name", SLOW, "--repository", str(repository), "--force"]
        + ["--labels", str(tmp_path / "labels.txt"), *flags]
    )
    assert published == 0, capsys.readouterr().err
    assert (repository / SLOW / "2").is_dir()
    assert degrade.state(repository, SLOW)["degrade"]["in_flight"] == 3


# python -m loadtests.degrade: what it counts


def test_goodput_counts_answers_within_the_budget_and_saturation_is_a_median_past_it() -> None:
    from loadtests.degrade import Round, saturated

    step = Round("ramp", SLOW, rate=10, seconds=2, sent=20, ok_in_budget=15, degraded=5, statuses={"200": 20})
    assert step.goodput() == 7.5 and step.degraded_share() == 0.25
    assert not saturated(Round(**{**step.__dict__, "p50_ms": 240.0}), budget_s=0.25)
    assert saturated(Round(**{**step.__dict__, "p50_ms": 260.0}), budget_s=0.25)
    assert saturated(Round(**{**step.__dict__, "p50_ms": 20.0, "statuses": {"200": 19, "429": 1}}), budget_s=0.25)
