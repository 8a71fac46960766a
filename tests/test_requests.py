"""Control-stream entries -> requests, and every kind of garbage -> a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.keys import Keys
from publisher.requests import MAX_TOKENS_FIELD, Request, RequestError, parse_request


def test_a_redis_cli_entry_parses() -> None:
    fields = {b"op": b"subscribe", b"tokens": b"408065,884737", b"mode": b"full", b"client": b"ops"}
    assert parse_request(fields) == Request("subscribe", (408065, 884737), "ops", "full")


def test_rebalance_and_release_need_no_tokens() -> None:
    assert parse_request({"op": "rebalance", "client": "ops"}) == Request("rebalance", (), "ops")
    assert parse_request({"op": "release", "client": "gone"}) == Request("release", (), "gone")


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
        ({"op": "release", "tokens": "1"}, "field 'tokens' makes no sense for release"),
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


def test_session_is_a_client_timeout_in_seconds_on_any_op_but_release_and_rebalance() -> None:
    from publisher.requests import MAX_TTL, RequestError, parse_request

    for op in ("subscribe", "unsubscribe", "set"):
        assert parse_request({"op": op, "tokens": "1", "session": "60"}).session == 60.0
    assert parse_request({"op": "mode", "tokens": "1", "mode": "ltp", "session": "0.5"}).session == 0.5
    assert parse_request({"op": "subscribe", "tokens": "1"}).session is None
    for bad in ("0", "-1", "abc", "nan", "inf", str(MAX_TTL + 1)):
        with pytest.raises(RequestError, match="bad session"):
            parse_request({"op": "subscribe", "tokens": "1", "session": bad})
    for op in ("release", "rebalance"):
        with pytest.raises(RequestError, match="field 'session' makes no sense"):
            parse_request({"op": op, "session": "60"})


_CRAFTED = st.sampled_from(
    ["..", "*", "{", "}", "{kite}", "../../etc", "a\nb", "kite2:claims", "x y", "", " ", "\x00", "é", "ops"]
)
_LONG = st.text(min_size=65, max_size=300)
_VALUES = st.one_of(st.binary(max_size=80), st.text(max_size=80), _CRAFTED, _LONG)
_FIELDS = st.dictionaries(
    st.one_of(st.sampled_from(["op", "tokens", "mode", "client", "ttl", "session"]), st.text(max_size=10)),
    _VALUES,
    max_size=6,
)
_OPS = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "unsubscribe", "mode", "set", "release", "rebalance"])},
    optional={"tokens": _VALUES, "mode": _VALUES, "client": _VALUES, "ttl": _VALUES},
)


@settings(max_examples=1500)
@given(st.one_of(_FIELDS, _OPS), st.booleans())
def test_any_entry_is_a_request_or_a_clear_error_and_its_keys_stay_in_the_namespace(fields, as_bytes):
    if as_bytes:
        fields = {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
                  for k, v in fields.items()}  # fmt: skip
    try:
        request = parse_request(fields)
    except RequestError as exc:
        assert str(exc) and "\n" not in str(exc)[:200]
        return
    keys = Keys("kite")
    for key in (keys.claims(request.client), keys.deadlines(request.client)):
        assert key.startswith("kite:") and key.isprintable() and not set(key) & set("{}*?[] \n\r\\")
    assert all(0 < t < 2**32 for t in request.tokens)
