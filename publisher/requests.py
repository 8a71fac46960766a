"""A control-stream entry -> a validated request, or a clear error."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kitewire.codec import MODE_QUOTE, MODES
from kitewire.instruments import normal_symbol, split_items

OPS = ("subscribe", "unsubscribe", "mode", "set", "rebalance", "release")
RELEASES = ("unsubscribe", "release")  # ops that only drop claims
DEFAULT_CLIENT = "default"
MAX_TOKENS_FIELD = 200_000  # characters; 9000 tokens of 10 digits and a comma is ~99k
MAX_TOKENS_PER_REQUEST = 20_000
MAX_FIELD = 64
MAX_TTL = 7 * 24 * 3600  # a week: a claim meant to last longer should not expire
_OPS_TEXT = "subscribe, unsubscribe, mode, set, rebalance or release"
_CLIENT = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


class RequestError(ValueError):
    """The entry is not a valid request; the message says why, for the result's `error`."""


@dataclass(frozen=True)
class Request:
    """One validated control request."""

    op: str
    tokens: tuple[int, ...]  # empty only for rebalance and release, or when every item is a symbol
    client: str
    mode: str | None = None  # None only for unsubscribe
    ttl: float | None = None  # seconds until the claim lapses by itself (subscribe, mode, set)
    symbols: tuple[str, ...] = ()  # EXCHANGE:TRADINGSYMBOL items, for the publisher to resolve
    # A session client's timeout (seconds): its claims live while its heartbeat is fresher
    session: float | None = None

    def resolved(self, tokens: tuple[int, ...]) -> Request:
        """This request with its symbols replaced by their ``tokens``."""
        merged = tuple(dict.fromkeys((*self.tokens, *tokens)))
        if len(merged) > MAX_TOKENS_PER_REQUEST:
            raise RequestError(f"too many tokens ({len(merged)}, at most {MAX_TOKENS_PER_REQUEST})")
        return dataclasses.replace(self, tokens=merged, symbols=())


def _text(fields: Mapping[bytes | str, bytes | str], name: str, limit: int) -> str | None:
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"field '{name}' is not UTF-8 text") from None
    if len(value) > limit:
        raise RequestError(f"field '{name}' is too long ({len(value)} characters, at most {limit})")
    return value.strip()


def parse_tokens(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Instrument tokens and ``EXCHANGE:SYMBOL`` items separated by commas and/or spaces
    (see ``split_items``); duplicates dropped, order kept."""
    tokens: dict[int, None] = {}
    symbols: dict[str, None] = {}
    for part in split_items(text):
        if ":" in part:
            try:
                symbols[normal_symbol(part)] = None
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            continue
        if not part.isascii() or not part.isdigit():
            raise RequestError(f"bad token {part[:20]!r}: tokens are positive integers (or EXCHANGE:SYMBOL)")
        token = int(part)
        if not 0 < token < 2**32:
            raise RequestError(f"bad token {part[:20]!r}: out of range")
        tokens[token] = None
    if not tokens and not symbols:
        raise RequestError("field 'tokens' holds no token")
    if len(tokens) + len(symbols) > MAX_TOKENS_PER_REQUEST:
        count = len(tokens) + len(symbols)
        raise RequestError(f"too many tokens ({count}, at most {MAX_TOKENS_PER_REQUEST})")
    return tuple(tokens), tuple(symbols)


def parse_request(fields: Mapping[bytes | str, bytes | str]) -> Request:
    """Validate a control-stream entry's fields (bytes or str keys and values)."""
    op = _text(fields, "op", MAX_FIELD)
    if not op:
        raise RequestError(f"missing field 'op' ({_OPS_TEXT})")
    if op not in OPS:
        raise RequestError(f"unknown op {op[:20]!r} ({_OPS_TEXT})")
    client = _text(fields, "client", MAX_FIELD) or DEFAULT_CLIENT
    if not _CLIENT.match(client):
        raise RequestError(f"bad client {client!r}: letters, digits and _ . : @ - only")
    if op in ("rebalance", "release"):  # they act on what is held
        for name in ("tokens", "mode", "ttl", "session"):
            if _text(fields, name, MAX_TOKENS_FIELD) is not None:
                raise RequestError(f"field '{name}' makes no sense for {op} (it acts on what is held)")
        return Request(op, (), client)
    tokens_text = _text(fields, "tokens", MAX_TOKENS_FIELD)
    if tokens_text is None:
        raise RequestError("missing field 'tokens'")
    tokens, symbols = parse_tokens(tokens_text)
    mode = _text(fields, "mode", MAX_FIELD) or None
    if mode is not None and mode not in MODES:
        raise RequestError(f"unknown mode {mode[:20]!r} (ltp, quote or full)")
    if op == "mode" and mode is None:
        raise RequestError("missing field 'mode' (ltp, quote or full)")
    if op in ("subscribe", "set"):
        mode = mode or MODE_QUOTE
    if op == "unsubscribe":
        mode = None
    ttl = _ttl(_text(fields, "ttl", MAX_FIELD) or None, op)
    session = _seconds(_text(fields, "session", MAX_FIELD) or None, "session")
    return Request(op, tokens, client, mode, ttl, symbols, session)


def _ttl(text: str | None, op: str) -> float | None:
    if text is None:
        return None
    if op == "unsubscribe":
        raise RequestError("field 'ttl' makes no sense for unsubscribe")
    return _seconds(text, "ttl")


def _seconds(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise RequestError(f"bad {name} {text[:20]!r}: a number of seconds") from None
    if not 0 < seconds <= MAX_TTL:  # also refuses nan and inf
        raise RequestError(f"bad {name} {text[:20]!r}: more than 0 and at most {MAX_TTL} seconds (a week)")
    return seconds
