"""Settings: defaults, validation, one clear line per error, secrets kept secret."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import Keys, SettingsError, load_client_timeout, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in (
        "KITE_API_KEY",
        "KITE_ACCESS_TOKEN",
        "KITE_WS_URL",
        "REDIS_URL",
        "KITEBUS_NAMESPACE",
        "KITEBUS_CONNECTIONS",
        "KITEBUS_TOKENS_PER_CONNECTION",
        "KITEBUS_CLIENT_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_contracts() -> None:
    s = load_settings()
    assert (s.kite_ws_url, s.redis_url, s.namespace) == (
        "wss://ws.kite.trade",
        "redis://localhost:6379/0",
        "kite",
    )
    assert (s.connections, s.tokens_per_connection, s.capacity) == (3, 3000, 9000)


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITEBUS_CONNECTIONS", "2")
    monkeypatch.setenv("KITEBUS_NAMESPACE", "paper")
    monkeypatch.setenv("KITE_WS_URL", "ws://127.0.0.1:9000")
    s = load_settings()
    assert (s.connections, s.namespace, s.kite_ws_url) == (2, "paper", "ws://127.0.0.1:9000")


def test_dotenv_file_is_read(tmp_path) -> None:
    (tmp_path / ".env").write_text("KITEBUS_TOKENS_PER_CONNECTION=500\n")
    assert load_settings().tokens_per_connection == 500


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KITEBUS_CONNECTIONS", "4"),
        ("KITEBUS_CONNECTIONS", "0"),
        ("KITEBUS_CONNECTIONS", "three"),
        ("KITEBUS_TOKENS_PER_CONNECTION", "3001"),
        ("KITEBUS_NAMESPACE", "has space"),
        ("KITE_WS_URL", "http://ws.kite.trade"),
        ("REDIS_URL", "localhost:6379"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message and "\n" not in message


def test_credentials_required_for_publish_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="KITE_API_KEY and KITE_ACCESS_TOKEN"):
        load_settings().require_credentials()
    monkeypatch.setenv("KITE_API_KEY", "key-123")
    monkeypatch.setenv("KITE_ACCESS_TOKEN", "secret-456")
    s = load_settings()
    assert s.require_credentials() == ("key-123", "secret-456")
    assert "secret-456" not in repr(s) and "secret-456" not in str(s.model_dump())


def test_cli_prints_one_line_without_traceback(tmp_path) -> None:
    env = {"KITEBUS_CONNECTIONS": "9", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "kitebus", "status"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "KITEBUS_CONNECTIONS" in result.stderr and "Traceback" not in result.stderr


def test_keys_follow_the_namespace() -> None:
    keys = Keys("paper")
    assert keys.ticks(408065) == "paper:ticks:408065"
    assert keys.conn(2) == "paper:conn:2"
    assert keys.claims("strat-1") == "paper:claims:strat-1"
    assert (keys.control, keys.control_results) == ("paper:control", "paper:control:results")


def test_instruments_is_a_path_or_an_http_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITEBUS_INSTRUMENTS", "ftp://example.com/instruments.csv")
    with pytest.raises(SettingsError, match="KITEBUS_INSTRUMENTS: a path or an http"):
        load_settings()
    monkeypatch.setenv("KITEBUS_INSTRUMENTS", " https://api.kite.trade/instruments ")
    assert load_settings().instruments == "https://api.kite.trade/instruments"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf", "604801"])
def test_a_bad_client_timeout_is_a_clear_settings_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KITEBUS_CLIENT_TIMEOUT", value)
    for load in (load_settings, load_client_timeout):  # the library reads it alone, without Settings
        with pytest.raises(SettingsError) as caught:
            load()
        message = str(caught.value)
        assert message.startswith("invalid setting KITEBUS_CLIENT_TIMEOUT: must be a number of seconds")
        assert repr(value) in message and "\n" not in message


def test_the_client_timeout_defaults_to_a_minute(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert load_settings().client_timeout == load_client_timeout() == 60.0
    (tmp_path / ".env").write_text("KITEBUS_CLIENT_TIMEOUT=2.5\n")
    assert load_settings().client_timeout == load_client_timeout() == 2.5
