"""Control-stream entries -> requests, and every kind of garbage -> a clear error."""

from __future__ import annotations

import pytest

from publisher.requests import MAX_TOKENS_FIELD, Request, RequestError, parse_request


def test_a_redis_cli_entry_parses() -> None:
    fields = {b"op": b"subscribe", b"tokens": b"408065,884737", b"mode": b"full", b"client": b"ops"}
    assert parse_request(fields) == Request("subscribe", (408065, 884737), "ops", "full")


def test_rebalance_needs_no_tokens() -> None:
    assert parse_request({"op": "rebalance", "client": "ops"}) == Request("rebalance", (), "ops")


def test_defaults_and_separators() -> None:
    request = parse_request({"op": "subscribe", "tokens": " 1, 2  3,,4 2 "})
    assert request == Request("subscribe", (1, 2, 3, 4), "default", "quote")
    assert parse_request({"op": "unsubscribe", "tokens": "5", "mode": "full"}).mode is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "missing field 'op'"),
        ({"op": "delete", "tokens": "1"}, "unknown op"),
        ({"op": "subscribe"}, "missing field 'tokens'"),
        ({"op": "subscribe", "tokens": ""}, "holds no token"),
        ({"op": "subscribe", "tokens": "408065,abc"}, "bad token 'abc'"),
        ({"op": "subscribe", "tokens": "-5"}, "bad token '-5'"),
        ({"op": "subscribe", "tokens": "1.5"}, "bad token"),
        ({"op": "subscribe", "tokens": "0"}, "out of range"),
        ({"op": "subscribe", "tokens": str(2**32)}, "out of range"),
        ({"op": "subscribe", "tokens": "١٢٣"}, "bad token"),  # non-ASCII digits
        ({"op": "subscribe", "tokens": "1", "mode": "deep"}, "unknown mode"),
        ({"op": "mode", "tokens": "1"}, "missing field 'mode'"),
        ({"op": "rebalance", "tokens": "1"}, "field 'tokens' makes no sense for rebalance"),
        ({"op": "rebalance", "mode": "full"}, "field 'mode' makes no sense for rebalance"),
        ({"op": "rebalance", "client": "a b"}, "bad client"),
        ({"op": "subscribe", "tokens": "1", "client": "a b"}, "bad client"),
        ({"op": "subscribe", "tokens": "1", "client": "x" * 65}, "too long"),
        ({"op": "subscribe", "tokens": "1," * MAX_TOKENS_FIELD}, "too long"),
        ({"op": "subscribe", "tokens": ",".join(map(str, range(1, 20_002)))}, "too many tokens"),
        ({b"op": b"\xff\xfe", b"tokens": b"1"}, "not UTF-8"),
    ],
)
def test_garbage_is_rejected_with_a_clear_message(fields, message) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(fields)


def test_ttl_is_a_positive_number_of_seconds_up_to_a_week() -> None:
    from publisher.requests import MAX_TTL, RequestError, parse_request

    base = {"op": "subscribe", "tokens": "1", "client": "a"}
    assert parse_request(base | {"ttl": "7200"}).ttl == 7200.0
    assert parse_request(base | {"ttl": "0.5"}).ttl == 0.5
    assert parse_request(base).ttl is None
    for bad in ("0", "-1", "abc", "nan", "inf", str(MAX_TTL + 1)):
        with pytest.raises(RequestError, match="bad ttl"):
            parse_request(base | {"ttl": bad})
    with pytest.raises(RequestError, match="no sense for unsubscribe"):
        parse_request({"op": "unsubscribe", "tokens": "1", "ttl": "5"})
