"""Canary rollouts: the routing function, the rollout written into config.pbtxt by `builder rollout` and
`builder publish --canary`, its refusals, and the per-version figures `--status` reads from /metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from builder import model_config, rollout
from builder.cli import main
from server.metrics import GatewayMetrics
from server.preprocess import PreprocessSpec
from server.rollout import DEFAULT_SHADOW_PERCENT, Guard, Rollout
from server.shadow import CanaryWatch
from server.triton import model_info_from_config
from tests.onnx_variants import conv_classifier

MODEL = "digits"
SPEC = PreprocessSpec(image_size=4, resize_size=4, mean=(0.5,), std=(0.25,), color_mode="L")


def _config(**overrides) -> model_config.ModelConfig:
    return model_config.ModelConfig(
        name=MODEL,
        inputs=(model_config.TensorSpec("input", (1, 4, 4)),),
        outputs=(model_config.TensorSpec("logits", (2,), label_filename="labels.txt"),),
        parameters={**SPEC.to_parameters(), "labels": json.dumps(["a", "b"])},
        **overrides,
    )


def _repository(tmp_path: Path, versions: int = 2, **overrides) -> Path:
    """A model folder as publish leaves it (version folders with their build.json, one config)."""
    config = _config(**overrides)
    model_dir = tmp_path / "repo" / MODEL
    for version in range(1, versions + 1):
        (model_dir / str(version)).mkdir(parents=True)
        record = {"config": {"parameters": dict(config.parameters)}}
        (model_dir / str(version) / "build.json").write_text(json.dumps(record))
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(model_config.render(config))
    return tmp_path / "repo"


def _split(started: Rollout) -> tuple[int, int, float, str]:
    return started.stable, started.canary, started.canary_percent, started.sticky_header


def _served(repository: Path) -> model_config.ModelConfig:
    return model_config.parse((repository / MODEL / "config.pbtxt").read_text())


# The routing function


def test_a_ten_percent_canary_gets_ten_percent_of_2000_requests() -> None:
    canary = Rollout(stable=1, canary=2, canary_percent=10)
    draw = random.Random(0).random
    chosen = [canary.choose(draw=draw) for _ in range(2000)]
    share = chosen.count(2) / len(chosen)
    assert set(chosen) == {1, 2}
    assert 0.08 <= share <= 0.12, share


def test_a_sticky_rollout_gives_one_client_one_version_and_splits_clients_by_the_percentage() -> None:
    sticky = Rollout(stable=1, canary=2, canary_percent=10, sticky_header="x-client-id")
    clients = [f"client-{i}" for i in range(2000)]
    first = {c: sticky.choose(c, draw=lambda: 0.0) for c in clients}
    # The draw is ignored for a client that names itself: every request of a client lands on one version.
    assert all(sticky.choose(c, draw=lambda: 0.999) == v for c, v in first.items())
    assert 0.08 <= list(first.values()).count(2) / len(clients) <= 0.12
    # Without the header, the request is drawn like any other.
    assert sticky.choose(None, draw=lambda: 0.0) == 2 and sticky.choose("", draw=lambda: 0.5) == 1


def test_zero_and_a_hundred_percent_send_everything_one_way() -> None:
    draws = [i / 1000 for i in range(1000)]
    assert {Rollout(1, 2, 0).choose(draw=lambda d=d: d) for d in draws} == {1}
    assert {Rollout(1, 2, 100).choose(draw=lambda d=d: d) for d in draws} == {2}


def test_the_gateway_reads_the_rollout_from_the_config_triton_returns(caplog) -> None:
    config = model_config.with_rollout(_config(), Rollout(3, 4, 12.5, "x-client-id"))
    # Triton's model-config API in JSON: parameters as {"key": {"string_value": ...}}.
    triton_json = {
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 4, 4]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [2]}],
        "max_batch_size": 32,
        "version_policy": {"specific": {"versions": ["3", "4"]}},
        "parameters": {k: {"string_value": v} for k, v in config.parameters.items()},
    }
    info = model_info_from_config(MODEL, triton_json)
    assert info.rollout == Rollout(3, 4, 12.5, "x-client-id") and info.specific_versions == (3, 4)
    assert config.version_policy == "specific" and config.specific_versions == (3, 4)
    # A rollout the gateway cannot read (edited by hand) is ignored; the stable version it names serves
    # every request (the newest version, the canary, would otherwise get them all with no guard rail).
    triton_json["parameters"]["rollout.max_error_rate"] = {"string_value": "nan"}
    with caplog.at_level(logging.WARNING, logger="server.triton"):
        for _ in range(3):  # the config read again each TTL: logged once
            info = model_info_from_config(MODEL, triton_json)
    assert info.rollout is None and info.specific_versions == (3,)
    assert CanaryWatch(GatewayMetrics(CollectorRegistry())).route(info, {}) == "3"
    assert [r.getMessage() for r in caplog.records if "ignoring its rollout" in r.getMessage()] == [
        "model 'digits': ignoring its rollout parameters (max_error_rate nan is not between 0 and 1): "
        "version 3 serves every request"
    ]
    # Without a readable stable version, Triton's own choice serves.
    triton_json["parameters"]["rollout.stable"] = {"string_value": "three"}
    info = model_info_from_config(MODEL, triton_json)
    assert info.rollout is None and info.specific_versions == (3, 4)


@pytest.mark.parametrize(("command", "kept"), [("--abort", 1), ("--promote", 2)])
def test_a_rollout_with_unreadable_rails_is_still_aborted_and_promoted(tmp_path, capsys, command, kept) -> None:
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    config = _served(repository)
    broken = {**config.parameters, "rollout.max_error_rate": "nan", "rollout.shadow_percent": "lots"}
    model_config.write_config(repository / MODEL, dataclasses.replace(config, parameters=broken))
    shown = rollout.state(repository, MODEL)
    assert shown["rollout"] is None and "cannot be read" in shown["rollout_unreadable"]
    # Unreadable, the rollout is followed by no gateway: --promote asks none.
    assert (
        main(["rollout", MODEL, command, "--repository", str(repository), "--gateway-url", "http://127.0.0.1:9"]) == 0
    )
    served = _served(repository)
    assert served.specific_versions == (kept,)
    assert not [k for k in served.parameters if k.startswith("rollout.")]


# builder rollout


def test_a_rollout_starts_beside_the_served_version_and_is_promoted(tmp_path) -> None:
    repository = _repository(tmp_path, versions=2, version_policy="specific", specific_versions=(1,))
    started = rollout.start(repository, MODEL, 10)
    assert _split(started) == (1, 2, 10, "")
    config = _served(repository)
    assert config.specific_versions == (1, 2) and config.parameters["rollout.canary_percent"] == "10"
    assert model_config.parse(model_config.render(config)).parameters == config.parameters
    # A new percentage keeps the versions.
    assert _split(rollout.start(repository, MODEL, 50, sticky_header="X-Client-ID")) == (1, 2, 50, "x-client-id")
    assert rollout.promote(repository, MODEL) == 2
    promoted = _served(repository)
    assert promoted.specific_versions == (2,)
    assert not any(k.startswith("rollout.") for k in promoted.parameters)
    # Everything else in the config is as it was.
    assert promoted.parameters == _config().parameters and promoted.inputs == _config().inputs


def test_an_aborted_rollout_serves_the_stable_version_alone(tmp_path) -> None:
    # After a plain publish under the `latest` policy the newest is served alone: the one before is stable.
    repository = _repository(tmp_path, versions=3)
    assert _split(rollout.start(repository, MODEL, 5)) == (2, 3, 5, "")
    assert rollout.abort(repository, MODEL) == 2
    assert _served(repository).specific_versions == (2,)
    assert rollout.state(repository, MODEL) == {"model": MODEL, "served": [2], "rollout": None, "reference": None}


def _refused(capsys, *argv: str) -> str:
    try:
        code = main(["rollout", *argv])
    except SystemExit as e:  # a flag argparse refuses
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["elsewhere", "--canary", "10"], "not in repository"),
        ([MODEL, "--canary", "10", "--version", "7"], "version 7"),
        ([MODEL, "--canary", "101"], "percentage"),
        ([MODEL, "--canary", "-1"], "percentage"),
        ([MODEL, "--canary", "nan"], "percentage"),
        ([MODEL, "--promote", "--abort"], "not allowed with"),
        ([MODEL, "--canary", "10", "--promote"], "not allowed with"),
        ([MODEL, "--promote"], "no rollout under way"),
        ([MODEL, "--abort"], "no rollout under way"),
        ([MODEL, "--promote", "--version", "2"], "go with --canary"),
        ([MODEL], "one of the arguments"),
        ([MODEL, "--canary", "10", "--sticky-header", "x client"], "not an HTTP header name"),
        ([MODEL, "--canary", "10", "--sticky-header", "x" * 5000], "at most 128"),
        ([MODEL, "--canary", "10", "--min-agreement", "1.5"], "fraction from 0 to 1"),
        ([MODEL, "--canary", "10", "--max-error-rate", "-0.1"], "fraction from 0 to 1"),
        ([MODEL, "--canary", "10", "--max-p99-ratio", "0.5"], "neither 0 (off)"),
        ([MODEL, "--canary", "10", "--max-p99-ratio", "inf"], "finite"),
        ([MODEL, "--canary", "10", "--min-requests", "0"], "at least 1"),
        ([MODEL, "--canary", "10", "--min-requests", "1000001"], "min_requests"),
        ([MODEL, "--canary", "10", "--shadow-percent", "150"], "percentage"),
        ([MODEL, "--promote", "--min-agreement", "0.5"], "go with --canary"),
        ([MODEL, "--status", "--shadow-percent", "5"], "go with --canary"),
        ([MODEL, "--reference", MODEL], "its own reference"),
        ([MODEL, "--reference", "no/such"], "not a model name"),
        ([MODEL, "--promote", "--reference-percent", "5"], "goes with --reference"),
        ([MODEL, "--reference", "other", "--reference-percent", "101"], "percentage"),
    ],
)
def test_bad_rollout_commands_leave_the_repository_unchanged(tmp_path, capsys, argv, message) -> None:
    repository = _repository(tmp_path, versions=2)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    assert message in _refused(capsys, *argv, "--repository", str(repository))
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before
    assert sorted(p.name for p in (repository / MODEL).iterdir()) == ["1", "2", "config.pbtxt"]


def test_a_model_with_one_version_has_nothing_to_roll_out(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=1)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    assert "only one version" in _refused(capsys, MODEL, "--canary", "10", "--repository", str(repository))
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


def test_another_version_waits_for_the_rollout_under_way(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=3)
    rollout.start(repository, MODEL, 10, version=2)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    err = _refused(capsys, MODEL, "--canary", "10", "--version", "3", "--repository", str(repository))
    assert "promote or abort" in err
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


def test_versions_published_with_other_labels_are_not_served_side_by_side(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    record = {"config": {"parameters": {**_config().parameters, "labels": json.dumps(["x", "y"])}}}
    (repository / MODEL / "1" / "build.json").write_text(json.dumps(record))
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    assert "other preprocessing or labels" in _refused(capsys, MODEL, "--canary", "10", "--repository", str(repository))
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


def test_the_cli_starts_and_promotes_a_rollout(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    assert main(["rollout", MODEL, "--canary", "10", "--repository", str(repository)]) == 0
    started = json.loads(capsys.readouterr().out)["rollout"]
    assert {k: started[k] for k in ("stable", "canary", "canary_percent", "sticky_header")} == {
        "stable": 1,
        "canary": 2,
        "canary_percent": 10.0,
        "sticky_header": "",
    }
    assert main(["rollout", MODEL, "--promote", "--force", "--repository", str(repository)]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": MODEL, "serving": 2}


# builder publish --canary


def _publish(tmp_path: Path, repository: Path, *extra: str) -> int:
    onnx_path = conv_classifier(tmp_path / "model.onnx")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    flags = ["--resize", "4", "--crop", "4", "--color-mode", "L", "--mean", "0.5", "--std", "0.25"]
    try:
        return main(
            ["publish", "--onnx", str(onnx_path), "--name", MODEL, "--repository", str(repository)]
            + ["--labels", str(tmp_path / "labels.txt"), *flags, *extra]
        )
    except SystemExit as e:  # a flag argparse refuses
        return int(e.code or 0)


def test_publish_with_a_canary_keeps_the_served_version_stable(tmp_path, capsys) -> None:
    repository = tmp_path / "repo"
    assert _publish(tmp_path, repository) == 0
    assert _publish(tmp_path, repository) == 0  # a plain publish: version 2 alone, as before
    assert model_config.served_versions(_served(repository), [1, 2]) == [2]
    assert _publish(tmp_path, repository, "--canary", "10") == 0, capsys.readouterr().err
    config = _served(repository)
    assert config.specific_versions == (2, 3)
    started = model_config.rollout_of(config)
    assert started is not None and _split(started) == (2, 3, 10, "")
    # publish --canary writes the default shadow share and guard rails, and an id of its own.
    assert started.guard == Guard() and started.shadow_percent == DEFAULT_SHADOW_PERCENT and started.id


def test_publish_with_a_canary_refuses_a_new_model_and_a_bad_percentage(tmp_path, capsys) -> None:
    repository = tmp_path / "repo"
    assert _publish(tmp_path, repository, "--canary", "10") == 2
    assert "not in repository" in capsys.readouterr().err and not (repository / MODEL).exists()
    assert _publish(tmp_path, repository) == 0
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    assert _publish(tmp_path, repository, "--canary", "250") == 2
    assert "percentage" in capsys.readouterr().err
    assert _publish(tmp_path, repository, "--canary", "10", "--keep", "1") == 2
    assert "stable version" in capsys.readouterr().err
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before
    assert model_config.present_versions(repository / MODEL) == [1]


# --status


# What every gateway exports from its start (the sign that a gateway answered).
GATEWAY_BASE = """\
# TYPE gateway_request_bytes histogram
gateway_request_bytes_bucket{le="+Inf"} 0.0
gateway_request_bytes_count 0.0
gateway_request_bytes_sum 0.0
"""

METRICS = (
    GATEWAY_BASE
    + """\
# TYPE gateway_version_requests_total counter
gateway_version_requests_total{model="digits",status="200",version="1"} 90.0
gateway_version_requests_total{model="digits",status="503",version="1"} 2.0
gateway_version_requests_total{model="digits",status="200",version="2"} 10.0
gateway_version_requests_total{model="other",status="200",version="1"} 5.0
# TYPE gateway_version_request_seconds histogram
gateway_version_request_seconds_bucket{le="0.01",model="digits",version="1"} 50.0
gateway_version_request_seconds_bucket{le="0.1",model="digits",version="1"} 92.0
gateway_version_request_seconds_bucket{le="+Inf",model="digits",version="1"} 92.0
gateway_version_request_seconds_count{model="digits",version="1"} 92.0
gateway_version_request_seconds_sum{model="digits",version="1"} 1.0
gateway_version_request_seconds_bucket{le="0.01",model="digits",version="2"} 10.0
gateway_version_request_seconds_bucket{le="0.1",model="digits",version="2"} 10.0
gateway_version_request_seconds_bucket{le="+Inf",model="digits",version="2"} 10.0
gateway_version_request_seconds_count{model="digits",version="2"} 10.0
gateway_version_request_seconds_sum{model="digits",version="2"} 0.05
"""
)


def test_status_reads_requests_errors_and_quantiles_per_version_from_the_gateways_metrics() -> None:
    figures = rollout.traffic(METRICS, MODEL)
    assert figures["1"]["requests"] == 92 and figures["1"]["errors"] == 2
    assert figures["2"] == {"requests": 10, "errors": 0, "p50_ms": 5.0, "p99_ms": 9.9}
    # 46 of 92 observations are at most 0.01 s; the median interpolates within the first bucket.
    assert figures["1"]["p50_ms"] == pytest.approx(9.2)
    assert figures["1"]["p99_ms"] == pytest.approx(10 + 90 * (91.08 - 50) / 42, abs=0.01)
    assert set(figures) == {"1", "2"}


def test_status_without_a_gateway_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    argv = ["--status", "--gateway-url", "http://127.0.0.1:9", "--repository", str(repository)]
    assert "cannot read the gateway's metrics" in _refused(capsys, MODEL, *argv)


def test_status_logs_no_http_request_line_before_its_json(tmp_path, caplog, monkeypatch) -> None:
    import httpx

    repository = _repository(tmp_path, versions=2)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=GATEWAY_BASE))
    monkeypatch.setattr(
        httpx, "stream", lambda method, url, **kwargs: httpx.Client(transport=transport).stream(method, url, **kwargs)
    )
    with caplog.at_level(logging.INFO):
        assert rollout.status(repository, MODEL, "http://127.0.0.1:9")["versions"] == {}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("httpx")] == []


def _rollout_edited(repository: Path, **parameters: str) -> bytes:
    """The rollout's parameters in config.pbtxt changed by hand; returns the file's bytes."""
    config = _served(repository)
    edited = model_config.with_rollout(config, model_config.rollout_of(config))
    text = model_config.render(dataclasses.replace(edited, parameters={**edited.parameters, **parameters}))
    (repository / MODEL / "config.pbtxt").write_text(text)
    return text.encode()


@pytest.mark.parametrize("command", [["--promote"], ["--abort"], ["--canary", "20"]])
def test_a_rollout_naming_a_version_without_its_folder_is_refused(tmp_path, capsys, command) -> None:
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    # Version 7 has no folder; served alone it would leave the model nothing to load at Triton's next start.
    before = _rollout_edited(repository, **{"rollout.canary": "7", "rollout.stable": "9"})
    err = _refused(capsys, MODEL, *command, "--repository", str(repository))
    assert "has no folder" in err
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


def test_a_version_past_int64_in_the_config_is_a_one_line_refusal_and_no_rollout_for_the_gateway(
    tmp_path, capsys
) -> None:
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    before = _rollout_edited(repository, **{"rollout.canary": "99999999999999999999"})
    assert "is not a version" in _refused(capsys, MODEL, "--promote", "--repository", str(repository))
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before
    with pytest.raises(ValueError, match="int64"):
        Rollout.from_parameters(_served(repository).parameters)


# Guard rails, shadow share and reference, as the builder writes them and the gateway reads them


def test_a_rollout_carries_its_guard_rails_and_a_new_id_each_time_it_is_started(tmp_path) -> None:
    repository = _repository(tmp_path, versions=2)
    first = rollout.start(repository, MODEL, 10, guard={"min_agreement": 0.8, "min_requests": 20})
    assert first.guard == Guard(min_agreement=0.8, min_requests=20) and first.shadow_percent == 100
    parameters = _served(repository).parameters
    assert parameters["rollout.min_agreement"] == "0.8" and parameters["rollout.max_p99_ratio"] == "2"
    # What a gateway reads back from Triton's JSON of the config is the same rollout.
    triton_json = {
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 4, 4]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [2]}],
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }
    assert model_info_from_config(MODEL, triton_json).rollout == first
    # Another --canary keeps the rails it does not name, and is another rollout (a halted canary serves again).
    second = rollout.start(repository, MODEL, 10, shadow_percent=50, guard={"max_error_rate": 0.2})
    assert second.guard == Guard(max_error_rate=0.2, min_agreement=0.8, min_requests=20)
    assert second.shadow_percent == 50 and second.id != first.id


def test_a_rollout_written_before_guard_rails_has_none_and_no_shadow_share() -> None:
    old = Rollout.from_parameters({"rollout.stable": "1", "rollout.canary": "2", "rollout.canary_percent": "10"})
    assert old is not None and old.guard is None and old.shadow_percent == 0 and old.id == ""


def _reference(repository: Path, name: str = "digits-fp32", **overrides) -> None:
    (repository / name).mkdir()
    config = dataclasses.replace(_config(), name=name, **overrides)
    (repository / name / "config.pbtxt").write_text(model_config.render(config))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (None, "is not a model in repository"),
        ({"parameters": {**SPEC.to_parameters(), "labels": json.dumps(["b", "a"])}}, "other preprocessing"),
        ({"inputs": (model_config.TensorSpec("input", (1, 8, 8)),)}, "another input"),
    ],
)
def test_a_reference_missing_or_taking_other_inputs_is_refused(tmp_path, capsys, overrides, message) -> None:
    repository = _repository(tmp_path, versions=2)
    if overrides is not None:
        _reference(repository, **overrides)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    assert message in _refused(capsys, MODEL, "--reference", "digits-fp32", "--repository", str(repository))
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


def test_the_reference_model_is_set_and_removed_in_the_config(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    _reference(repository)
    argv = ["rollout", MODEL, "--repository", str(repository)]
    assert main([*argv, "--reference", "digits-fp32", "--reference-percent", "25"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"] == {"model": "digits-fp32", "percent": 25.0}
    parameters = _served(repository).parameters
    assert parameters["reference.model"] == "digits-fp32" and parameters["reference.shadow_percent"] == "25"
    # Kept across a rollout and its end.
    rollout.start(repository, MODEL, 10)
    rollout.promote(repository, MODEL)
    assert rollout.state(repository, MODEL)["reference"] == {"model": "digits-fp32", "percent": 25.0}
    assert main([*argv, "--reference", ""]) == 0
    assert not any(k.startswith("reference.") for k in _served(repository).parameters)


SHADOW_METRICS = """\
# TYPE gateway_shadow_comparisons_total counter
gateway_shadow_comparisons_total{against="stable",model="digits",version="2"} 40.0
gateway_shadow_comparisons_total{against="reference",model="digits",version="1"} 10.0
# TYPE gateway_shadow_agreements_total counter
gateway_shadow_agreements_total{against="stable",model="digits",version="2"} 4.0
gateway_shadow_agreements_total{against="reference",model="digits",version="1"} 10.0
# TYPE gateway_rollout_canary_halted gauge
gateway_rollout_canary_halted{model="digits",reason="agreement",rollout="r2",version="2"} 1.0
gateway_rollout_canary_halted{model="digits",reason="p99",rollout="r3",version="3"} 0.0
"""


def test_status_reads_agreement_and_the_halt_from_the_gateways_metrics() -> None:
    figures = rollout.traffic(METRICS + SHADOW_METRICS, MODEL, "r2")
    assert figures["2"]["agreement"] == {"stable": {"images": 40, "top1": 0.1}}
    assert figures["2"]["halted"] == "agreement"
    assert figures["1"]["agreement"] == {"reference": {"images": 10, "top1": 1.0}}
    assert "halted" not in figures["1"] and "3" not in figures
    # A halt of another rollout (the gateway drops it only when a request shows it the new one), or with
    # no rollout under way, is not this rollout's.
    assert "halted" not in rollout.traffic(METRICS + SHADOW_METRICS, MODEL, "r9")["2"]
    assert "halted" not in rollout.traffic(METRICS + SHADOW_METRICS, MODEL)["2"]


@pytest.fixture
def gateway_metrics():
    """A loopback HTTP server answering /metrics with the text the test puts in `served[0]`."""
    import http.server
    import threading

    served = [""]

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served[0].encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def _halted_metrics(started: Rollout, reason: str = "agreement") -> str:
    labels = f'model="{MODEL}",reason="{reason}",rollout="{started.id}",version="{started.canary}"'
    return f"# TYPE gateway_rollout_canary_halted gauge\ngateway_rollout_canary_halted{{{labels}}} 1.0\n"


def _judged_metrics(started: Rollout, requests: int) -> str:
    labels = f'model="{MODEL}",rollout="{started.id}",version="{started.canary}"'
    return (
        "# TYPE gateway_rollout_canary_requests counter\n"
        f"gateway_rollout_canary_requests_total{{{labels}}} {requests}.0\n"
    )


def test_promote_refuses_a_canary_the_gateway_halted_unless_forced(tmp_path, capsys, gateway_metrics) -> None:
    url, served = gateway_metrics
    repository = _repository(tmp_path, versions=2)
    started = rollout.start(repository, MODEL, 10)
    served[0] = METRICS + _halted_metrics(started)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    argv = ["--promote", "--repository", str(repository), "--gateway-url", url]
    error = _refused(capsys, MODEL, *argv)
    assert "halted version 2" in error and "agreement" in error and "--force" in error
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before
    assert main(["rollout", MODEL, *argv, "--force"]) == 0
    assert model_config.rollout_of(_served(repository)) is None and _served(repository).specific_versions == (2,)


def test_promote_waits_for_the_rails_to_judge_this_rollout_and_ignores_an_earlier_halt(
    tmp_path, capsys, gateway_metrics
) -> None:
    url, served = gateway_metrics
    repository = _repository(tmp_path, versions=2)
    halted = rollout.start(repository, MODEL, 10)
    again = rollout.start(repository, MODEL, 20, guard={"min_requests": 30})  # a new rollout, judged afresh
    argv = ["--promote", "--repository", str(repository), "--gateway-url", url]
    # The earlier rollout's halt and requests are not this one's: 29 of its own are not enough yet.
    served[0] = METRICS + _halted_metrics(halted) + _judged_metrics(halted, 500) + _judged_metrics(again, 29)
    error = _refused(capsys, MODEL, *argv)
    assert "has judged 29 requests of version 2" in error and "the 30 its guard rails need" in error
    served[0] = METRICS + _halted_metrics(halted) + _judged_metrics(again, 30)
    assert main(["rollout", MODEL, *argv]) == 0
    assert _served(repository).specific_versions == (2,)


def test_promote_refuses_what_answers_with_another_services_metrics(tmp_path, capsys, gateway_metrics) -> None:
    url, served = gateway_metrics
    served[0] = '# TYPE nv_inference_count counter\nnv_inference_count{model="digits",version="2"} 7.0\n'
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    error = _refused(capsys, MODEL, "--promote", "--repository", str(repository), "--gateway-url", url)
    assert "is not a gateway's metrics" in error and "no gateway_request_bytes series" in error


def test_promote_refuses_where_no_gateway_can_be_asked_unless_forced(tmp_path, capsys, monkeypatch) -> None:
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    # No --gateway-url: the gateway this environment would start (GATEWAY_PORT), where nothing listens.
    monkeypatch.setenv("GATEWAY_PORT", "9")
    error = _refused(capsys, MODEL, "--promote", "--repository", str(repository))
    assert "http://127.0.0.1:9/metrics" in error and "--force" in error
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before
    assert main(["rollout", MODEL, "--promote", "--force", "--repository", str(repository)]) == 0
    assert _served(repository).specific_versions == (2,)


def test_force_goes_with_promote_only(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    assert "--force goes with --promote" in _refused(
        capsys, MODEL, "--abort", "--force", "--repository", str(repository)
    )


def test_status_of_something_that_is_not_a_gateway_is_one_line_and_exit_2(tmp_path, capsys, gateway_metrics) -> None:
    url, served = gateway_metrics
    served[0] = "<html><body>a web page</body></html>"
    repository = _repository(tmp_path, versions=2)
    error = _refused(capsys, MODEL, "--status", "--repository", str(repository), "--gateway-url", url)
    assert "is not a gateway's metrics" in error
    # An error status is said as such, without the HTTP library's advice.
    error = _refused(capsys, MODEL, "--status", "--repository", str(repository), "--gateway-url", f"{url}/elsewhere")
    assert error.strip().endswith("/elsewhere/metrics answered 404 Not Found")


def test_a_promoted_version_is_not_rolled_out_again_against_the_one_it_retired(tmp_path, capsys) -> None:
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    rollout.promote(repository, MODEL)  # version 2 alone; version 1 retired
    before = (repository / MODEL / "config.pbtxt").read_text()
    error = _refused(capsys, MODEL, "--canary", "50", "--repository", str(repository))
    assert "version 2 of 'digits' is already the only version served" in error
    assert (repository / MODEL / "config.pbtxt").read_text() == before


@pytest.mark.spawns
def test_output_into_a_closed_pipe_is_no_error_message(tmp_path) -> None:
    import subprocess
    import sys

    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    command = [sys.executable, "-m", "builder", "rollout", MODEL, "--abort", "--repository", str(repository)]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes (as `| head` once it has its lines)
    try:
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""
    assert _served(repository).specific_versions == (1,)  # the abort itself was done


class _Hostile:
    """A loopback server that answers every connection by `answer(socket)`, in a thread of its own."""

    def __init__(self, answer) -> None:
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()

        def serve() -> None:
            while not self.stopped.is_set():
                try:
                    connection, _ = self.listener.accept()
                except OSError:
                    return
                with connection:
                    connection.recv(65536)
                    try:
                        answer(connection, self.stopped)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def _trickle(connection, stopped) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"#" * 100000:
        if stopped.wait(0.2):
            return
        connection.sendall(bytes([byte]))


def _endless(connection, stopped) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"# x\n" * 16384)
    while not stopped.is_set():
        connection.sendall(chunk)


@pytest.mark.parametrize("answer", [_trickle, _endless])
def test_promote_ends_in_bounded_time_and_memory_whatever_the_gateway_sends(tmp_path, capsys, monkeypatch, answer):
    monkeypatch.setattr(rollout, "METRICS_DEADLINE_S", 1.0)
    monkeypatch.setattr(rollout, "MAX_METRICS_BYTES", 1 << 20)
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    before = (repository / MODEL / "config.pbtxt").read_bytes()
    hostile = _Hostile(answer)
    try:
        error = _refused(capsys, MODEL, "--promote", "--repository", str(repository), "--gateway-url", hostile.url)
    finally:
        hostile.close()
    assert ("no whole answer within 1 s" in error) if answer is _trickle else ("more than 1 MiB" in error)
    assert (repository / MODEL / "config.pbtxt").read_bytes() == before


@pytest.mark.parametrize("value", ["NaN", "-Inf", "-1.0"])
def test_a_halt_gauge_that_is_not_0_counts_as_a_halt(tmp_path, capsys, gateway_metrics, value) -> None:
    url, served = gateway_metrics
    repository = _repository(tmp_path, versions=2)
    started = rollout.start(repository, MODEL, 10)
    served[0] = METRICS + _halted_metrics(started).replace(" 1.0", f" {value}") + _judged_metrics(started, 500)
    error = _refused(capsys, MODEL, "--promote", "--repository", str(repository), "--gateway-url", url)
    assert "halted version 2" in error


def test_promote_asks_every_gateway_named_and_refuses_if_one_halted(tmp_path, capsys, gateway_metrics) -> None:
    url, served = gateway_metrics
    repository = _repository(tmp_path, versions=2)
    started = rollout.start(repository, MODEL, 10)
    judged = METRICS + _judged_metrics(started, 500)
    halted = _HostileMetrics(judged + _halted_metrics(started))
    try:
        served[0] = judged  # this one judged the canary and did not halt it; the other one halted it
        argv = ["--promote", "--repository", str(repository), "--gateway-url", url, "--gateway-url", halted.url]
        assert f"the gateway at {halted.url} halted version 2" in _refused(capsys, MODEL, *argv)
    finally:
        halted.close()
    assert model_config.rollout_of(_served(repository)) is not None


def test_a_metrics_answer_naming_the_gateways_series_without_samples_is_not_a_gateway(
    tmp_path, capsys, gateway_metrics
) -> None:
    url, served = gateway_metrics
    repository = _repository(tmp_path, versions=2)
    started = rollout.start(repository, MODEL, 10)
    served[0] = "# HELP gateway_request_bytes x\n" + _judged_metrics(started, 500)
    error = _refused(capsys, MODEL, "--promote", "--repository", str(repository), "--gateway-url", url)
    assert "is not a gateway's metrics" in error


def test_the_default_gateway_url_follows_the_gateways_own_settings(monkeypatch) -> None:
    from builder.cli import _gateway_urls, build_parser

    def url(*argv: str) -> str:
        (only,) = _gateway_urls(build_parser().parse_args(["rollout", MODEL, "--status", *argv]))
        return only

    monkeypatch.delenv("GATEWAY_HOST", raising=False)
    monkeypatch.delenv("GATEWAY_PORT", raising=False)
    assert url() == "http://127.0.0.1:8080"
    monkeypatch.setenv("GATEWAY_PORT", "28080")
    monkeypatch.setenv("GATEWAY_HOST", "::1")
    assert url() == "http://[::1]:28080"
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    assert url() == "http://127.0.0.1:28080"
    assert url("--gateway-url", "") == ""  # given, even empty: refused as a URL, not replaced by the default


@pytest.mark.parametrize(
    "metrics",
    [
        'gateway_version_request_seconds_bucket{model="digits",version="2"} 1\n',  # no `le`
        'gateway_version_requests_total{model="digits",version="2",status="200"} +Inf\n',
    ],
)
def test_metrics_that_parse_but_are_not_the_gateways_are_one_line(tmp_path, capsys, gateway_metrics, metrics):
    url, served = gateway_metrics
    served[0] = metrics
    repository = _repository(tmp_path, versions=2)
    assert "is not a gateway's metrics" in _refused(
        capsys, MODEL, "--status", "--repository", str(repository), "--gateway-url", url
    )


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:9:1", "http://127.0.0.1:9/\x01"])
def test_a_malformed_gateway_url_is_one_line(tmp_path, capsys, url):
    repository = _repository(tmp_path, versions=2)
    rollout.start(repository, MODEL, 10)
    assert "cannot read the gateway's metrics" in _refused(
        capsys, MODEL, "--promote", "--repository", str(repository), "--gateway-url", url
    )


class _HostileMetrics:
    """A second loopback /metrics server, answering `text`."""

    def __init__(self, text: str) -> None:
        self.server = _Hostile(
            lambda connection, stopped: connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(text.encode()), text.encode())
            )
        )
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()
