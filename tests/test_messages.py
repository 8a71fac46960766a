"""Kite text messages."""

from __future__ import annotations

import json

import pytest

from kitewire import messages


def test_requests_are_kites_json() -> None:
    assert json.loads(messages.subscribe([408065, 884737])) == {
        "a": "subscribe",
        "v": [408065, 884737],
    }
    assert json.loads(messages.unsubscribe([408065])) == {"a": "unsubscribe", "v": [408065]}
    assert json.loads(messages.set_mode("full", [1, 2])) == {"a": "mode", "v": ["full", [1, 2]]}
    with pytest.raises(ValueError):
        messages.set_mode("deep", [1])


@pytest.mark.parametrize(
    ("text", "event"),
    [
        ('{"type": "error", "data": "bad token"}', messages.ServerError("bad token")),
        ('{"type": "order", "data": {"order_id": "1"}}', messages.OrderUpdate({"order_id": "1"})),
        ('{"type": "message", "data": "hello"}', messages.ServerMessage("hello")),
        ('{"type": "other"}', None),
        ("not json", None),
        ("[1, 2]", None),
        (b"\xff\xfe", None),
        ('{"type": "order", "data": "x"}', None),
    ],
)
def test_server_text_is_parsed_or_ignored(text, event) -> None:
    assert messages.parse_server_text(text) == event
