"""Gateway settings whose defaults are a security decision."""

from server.settings import Settings


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
