"""Credentials never shown: URLs masked in settings errors, the demo's panel, status."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import SettingsError, load_settings
from config.masking import mask_secrets, mask_url
from kitebus.demo import _help


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:hunter2@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
        ("rediss://app:hunter2@redis.example:6380/1", "rediss://app:***@redis.example:6380/1"),
        ("redis://hunter2@host/0", "redis://***@host/0"),
        ("redis://app:p%40ss:w@rd@host/0", "redis://app:***@host/0"),
        ("unix://:hunter2@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        (
            "redis+sentinel://u:hunter2@h1:26379,h2:26379,h3:26379/mymaster/0",
            "redis+sentinel://u:***@h1:26379,h2:26379,h3:26379/mymaster/0",
        ),
        (
            "redis+sentinel://u:pw1@h1:26379,v:pw2@h2:26379/svc",
            "redis+sentinel://u:***@h1:26379,v:***@h2:26379/svc",
        ),
        (
            "https://api.kite.trade/instruments?api_key=abc&access_token=xyz&exchange=NSE",
            "https://api.kite.trade/instruments?api_key=***&access_token=***&exchange=NSE",
        ),
        ("https://u:pw@host/x?password=pw&db=1#frag", "https://u:***@host/x?password=***&db=1#frag"),
        ("wss://ws.kite.trade?api_key=k&access_token=t", "wss://ws.kite.trade?api_key=***&access_token=***"),
        ("redis://:hun/ter2@host:6379/0", "redis://***@host:6379/0"),  # a raw '/' ends a parser's authority
        ("redis://u:hun?ter2@host/0?password=x", "redis://***@host/0?password=***"),
        ("redis://u:hun#ter2@host/0", "redis://***@host/0"),
        ("not a url", "not a url"),
        ("/var/data/instruments.csv", "/var/data/instruments.csv"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert "hunter2" not in mask_url(url)


def test_mask_secrets_masks_every_url_in_a_text() -> None:
    text = "fetch 'https://u:s3cret@h/i?token=t0k' failed; then redis://:pw@r:1/0: refused"
    shown = "fetch 'https://u:***@h/i?token=***' failed; then redis://:***@r:1/0: refused"
    assert mask_secrets(text) == shown


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url="http://admin:hunter2@redis.example:6379/0")
    message = str(caught.value)
    assert "REDIS_URL" in message and "redis.example" in message
    assert "hunter2" not in message and "admin:***@" in message


@pytest.mark.parametrize("url", ["redis://:hun/ter2@redis.example:6379/0", "redis://:hun#ter2@redis.example",
                                 "redis://u:hun?ter2@redis.example/0", "redis://:12/34hunter2@redis.example",
                                 "redis://u:1234/hunter2@redis.example/0"])
def test_a_password_that_is_not_percent_encoded_is_refused_without_showing_it(url: str) -> None:
    """Read as it is, such a URL puts part of the password where the port or host goes: a
    client's error would show it. The settings refuse it first, and say how to write it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url=url)
    message = str(caught.value)
    assert "REDIS_URL" in message and "must be percent-encoded" in message and "redis.example" in message
    assert "hunter2" not in message and "ter2" not in message


def test_a_bad_sentinel_style_url_is_named_without_passwords() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url="sentinel://u:hunter2@h1:1,w:hunter3@h2:2/svc", instruments="ftp://x:pw9@h/i")
    message = str(caught.value)
    assert "hunter2" not in message and "hunter3" not in message and "pw9" not in message


def test_the_demo_panel_shows_redis_url_without_its_password() -> None:
    panel = _help("redis://:hunter2@redis.example:6379/0", "demo", None, Path("/tmp/i.csv"), False)
    text = str(panel.renderable)
    assert "export REDIS_URL=redis://:***@redis.example:6379/0" in text and "hunter2" not in text
    plain = str(_help("redis://127.0.0.1:7000/0", "demo", 7000, Path("/tmp/i.csv"), False).renderable)
    assert "export REDIS_URL=redis://127.0.0.1:7000/0 KITEBUS_NAMESPACE=demo\n" in plain
