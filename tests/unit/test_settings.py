"""Gateway settings whose defaults are a security decision."""

import pytest

from server.app import create_app
from server.settings import NoApiKeys, Settings


def test_the_gateway_listens_on_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("GATEWAY_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    assert Settings().host == "0.0.0.0"


def test_docs_and_metrics_need_the_key_by_default_and_required_models_are_a_list(monkeypatch):
    for name in ("GATEWAY_DOCS_REQUIRE_KEY", "GATEWAY_METRICS_REQUIRE_KEY", "GATEWAY_REQUIRED_MODELS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.docs_require_key and settings.metrics_require_key
    assert settings.required_model_names() == ()
    monkeypatch.setenv("GATEWAY_REQUIRED_MODELS", " digits, resnet ,")
    assert Settings().required_model_names() == ("digits", "resnet")


API_KEY_VARIABLES = ("GATEWAY_API_KEYS", "GATEWAY_API_KEYS_FILE")


@pytest.mark.parametrize(
    "keys, file_text",
    [(" , ", None), (None, ""), (None, "\n  \n"), ("", None)],
    ids=["blanks", "an empty file", "a file of blank lines", "an empty variable"],
)
def test_a_key_source_without_keys_stops_the_gateway_from_starting(monkeypatch, tmp_path, keys, file_text):
    for name in API_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if keys is not None:
        monkeypatch.setenv("GATEWAY_API_KEYS", keys)
    if file_text is not None:
        (tmp_path / "keys").write_text(file_text)
        monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(tmp_path / "keys"))
    settings = Settings()
    with pytest.raises(NoApiKeys, match="holds no API key"):
        settings.load_api_keys()
    with pytest.raises(SystemExit, match="^gateway: error: GATEWAY_API_KEYS.* holds no API key"):
        create_app(settings)


def test_keys_are_read_from_either_source_and_none_is_no_key(monkeypatch, tmp_path):
    for name in API_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert Settings().load_api_keys() == ()
    (tmp_path / "keys").write_text("k3\n\n k4 \n")
    monkeypatch.setenv("GATEWAY_API_KEYS", " k1, ,k2")
    monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(tmp_path / "keys"))
    assert Settings().load_api_keys() == ("k1", "k2", "k3", "k4")
    monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(NoApiKeys, match="cannot read it"):
        Settings().load_api_keys()


def test_buffered_bodies_default_to_four_bodies_of_the_limit(monkeypatch):
    for name in ("GATEWAY_MAX_BODY_BYTES", "GATEWAY_MAX_BUFFERED_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().buffered_body_limit() == 4 * Settings().max_body_bytes
    monkeypatch.setenv("GATEWAY_MAX_BUFFERED_BODY_BYTES", "1000")
    assert Settings().buffered_body_limit() == 1000


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("GATEWAY_DRAIN_S", "-1", "greater than or equal to 0"),
        ("GATEWAY_TRACING", "maybe", "valid boolean"),
        ("GATEWAY_PORT", "http", "valid integer"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_variable_and_exit_2(monkeypatch, capsys, variable, value, message):
    from server.app import create_app
    from server.settings import get_settings

    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            create_app()
    finally:
        get_settings.cache_clear()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"gateway: error: {variable}={value!r}: ") and message in error


@pytest.mark.parametrize(
    "variable, value", [("STACK_MAX_CRASHES", "0"), ("TRITON_GRPC_PORT", "abc"), ("GATEWAY_DRAIN_S", "-1")]
)
def test_the_stack_refuses_a_bad_setting_in_one_line_before_starting_anything(monkeypatch, capsys, variable, value):
    from stack.__main__ import main

    monkeypatch.setenv(variable, value)
    monkeypatch.setattr("sys.argv", ["python -m stack", "--repository", "/nonexistent"])
    assert main() == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"serve: error: {variable}={value!r}: ")
