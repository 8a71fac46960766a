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
        ('{"type": "order", "data": {"order_id": 7}}', messages.OrderUpdate({"order_id": 7})),
        ('{"type": "other"}', None),  # a type Kite may add one day: ignored, not an error
        ("not json", messages.Malformed("not JSON")),
        ('{"type": "order", "data": {"order_id": NaN}}', messages.Malformed("not JSON")),
        ("[1, 2]", messages.Malformed("not a JSON object")),
        (b"\xff\xfe", messages.Malformed("not JSON")),
        ("[" * 100_000, messages.Malformed("over 64 KB")),
        ("[" * 60_000, messages.Malformed("not JSON")),  # nested too deep to parse
        ('{"type": "order", "data": "x"}', messages.Malformed("order: data is not an object")),
        ('{"type": "order", "data": {"status": "OPEN"}}', messages.Malformed("order: no order_id")),
        ('{"type": "order", "data": {"order_id": ""}}', messages.Malformed("order: no order_id")),
        ('{"type": "order", "data": {"order_id": true}}', messages.Malformed("order: no order_id")),
    ],
)
def test_server_text_is_parsed_ignored_or_malformed(text, event) -> None:
    assert messages.parse_server_text(text) == event


def test_a_huge_order_is_malformed_however_it_is_encoded() -> None:
    body = json.dumps({"type": "order", "data": {"order_id": "1", "tag": "₹" * 22_000}}, ensure_ascii=False)
    assert len(body) < messages.MAX_TEXT < len(body.encode())
    assert messages.parse_server_text(body) == messages.Malformed("over 64 KB")
