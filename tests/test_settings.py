"""Settings: environment over TOML over defaults; the model registry's rules; no password in logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer.redis_clients import SentinelGroup
from producer.settings import Settings, redact


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INFERQ_"):
            monkeypatch.delenv(key)


def test_defaults_work_offline() -> None:
    settings = Settings()
    assert settings.broker == settings.backend == "redis://localhost:6379/0"
    assert settings.models.default_alias("embed") == "minilm"
    assert settings.models.default_alias("generate") == "smollm2"
    assert settings.models.default_alias("classify") is None  # zero-shot needs no classifier


def test_broker_and_backend_override_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_REDIS_URL", "redis://a:6379/1")
    monkeypatch.setenv("INFERQ_RESULT_BACKEND", "redis://b:6379/2")
    settings = Settings()
    assert settings.broker == "redis://a:6379/1"
    assert settings.backend == "redis://b:6379/2"


def test_environment_beats_toml_which_beats_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "inferq.toml"
    config.write_text('result_expires = 600\n[limits]\nmax_texts = 3\nmax_chars = 10\n'
                      '[models.classify.sst2]\nsource = "distilbert-base-uncased-finetuned-sst-2-english"\n')
    monkeypatch.setenv("INFERQ_CONFIG", str(config))
    monkeypatch.setenv("INFERQ_LIMITS__MAX_CHARS", "99")
    settings = Settings()
    assert settings.result_expires == 600
    assert (settings.limits.max_texts, settings.limits.max_chars) == (3, 99)
    # a kind named in the file replaces that kind only; the others keep their defaults
    assert settings.models.default_alias("classify") == "sst2"
    assert settings.models.default_alias("embed") == "minilm"


def test_models_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_MODELS__EMBED", '{"bge": {"source": "BAAI/bge-small-en-v1.5", "pooling": "cls"}}')
    settings = Settings()
    assert list(settings.models.embed) == ["bge"]
    assert settings.models.embed["bge"].pooling == "cls"


def test_a_kind_with_several_models_needs_exactly_one_default() -> None:
    with pytest.raises(ValidationError, match=r"models\.embed has 2 entries and 0 marked default = true"):
        Settings(models={"embed": {"a": {"source": "x"}, "b": {"source": "y"}}})


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_CONFIG", "/nonexistent/inferq.toml")
    with pytest.raises(FileNotFoundError, match=r"INFERQ_CONFIG names '/nonexistent/inferq\.toml'"):
        Settings()


def test_unknown_settings_and_bad_template_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match=r"must contain '\{\}' exactly once"):
        Settings(classify_label_template="This text is about")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(redis_ulr="redis://typo")  # type: ignore[call-arg]


def test_redact_hides_passwords() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:s3cret@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
    assert (redact("sentinel://:s3cret@a:26379/2;sentinel://:s3cret@b:26380/2")
            == "sentinel://:***@a:26379/2;sentinel://:***@b:26380/2")


def test_a_sentinel_url_names_the_sentinels_and_the_masters_database() -> None:
    settings = Settings(redis_url="sentinel://:pw@10.0.0.1:26379/3;sentinel://10.0.0.2;sentinel://10.0.0.3:5000",
                        sentinel_master="queue")
    group = SentinelGroup.from_url(settings.broker)
    assert group.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 5000)]
    assert (group.db, group.password, settings.sentinel_master) == (3, "pw", "queue")
    assert Settings().sentinel_master == "mymaster"


def test_a_sentinel_url_with_another_kind_of_entry_is_refused() -> None:
    with pytest.raises(ValidationError, match="'redis://b:6379' is not a sentinel://host:port entry"):
        Settings(redis_url="sentinel://a:26379;redis://b:6379")
    with pytest.raises(ValidationError, match="sentinel_master"):
        Settings(sentinel_master="")


def test_importing_the_producer_imports_no_torch_or_transformers() -> None:
    code = ("import sys, producer, producer.client, producer.cli, producer.bulk, producer.contract;"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'));"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_device_server_needs_its_key() -> None:
    with pytest.raises(ValidationError, match="device_server is set without device_server_key"):
        Settings(device_server="/run/inferq/gpu0.sock")
    assert Settings(device_server="/run/inferq/gpu0.sock", device_server_key="k").device_server_key is not None


def test_an_api_key_short_enough_to_guess_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty key matched a bare "Bearer": the gateway looked keyed and was open to anyone."""
    for key in ("", "sk-short"):
        monkeypatch.setenv("INFERQ_GATEWAY__API_KEYS", json.dumps({"webapp": key, "batch": "sk-" + "x" * 20}))
        with pytest.raises(ValidationError, match="API key\\(s\\) 'webapp' are shorter than 16 characters"):
            Settings()
    monkeypatch.setenv("INFERQ_GATEWAY__API_KEYS", json.dumps({"webapp": "sk-" + "x" * 13}))
    assert Settings().gateway.api_keys["webapp"].get_secret_value() == "sk-" + "x" * 13
