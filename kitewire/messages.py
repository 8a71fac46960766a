"""Kite ticker text messages: build the client's requests, parse the server's messages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kitewire.codec import MODES


def subscribe(tokens: Iterable[int]) -> str:
    """``{"a": "subscribe", "v": [...]}``"""
    return json.dumps({"a": "subscribe", "v": list(tokens)})


def unsubscribe(tokens: Iterable[int]) -> str:
    """``{"a": "unsubscribe", "v": [...]}``"""
    return json.dumps({"a": "unsubscribe", "v": list(tokens)})


def set_mode(mode: str, tokens: Iterable[int]) -> str:
    """``{"a": "mode", "v": [mode, [...]]}``"""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    return json.dumps({"a": "mode", "v": [mode, list(tokens)]})


@dataclass(frozen=True)
class ServerError:
    """``{"type": "error"}``: something the server wants surfaced."""

    message: str


@dataclass(frozen=True)
class OrderUpdate:
    """``{"type": "order"}``: an order postback for the account."""

    data: dict[str, Any]


@dataclass(frozen=True)
class ServerMessage:
    """``{"type": "message"}``: informational text."""

    message: str


@dataclass(frozen=True)
class Malformed:
    """A text frame that cannot be taken: not a JSON object, over ``MAX_TEXT`` bytes, or an
    order without an object ``data`` holding an ``order_id``."""

    reason: str


ServerEvent = ServerError | OrderUpdate | ServerMessage | Malformed
MAX_TEXT = 64 * 1024  # bytes: no text message of Kite's comes near it; past it nothing is parsed


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_server_text(text: str | bytes) -> ServerEvent | None:
    """Parse a server text frame, never raising: a JSON object of a type Kite may add later
    gives None (ignored); anything that is not Kite's JSON gives ``Malformed``."""
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT:
        return Malformed(f"over {MAX_TEXT // 1024} KB")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Malformed("not JSON")
    if not isinstance(data, dict):
        return Malformed("not a JSON object")
    kind, payload = data.get("type"), data.get("data")
    if kind == "error":
        return ServerError(str(payload))
    if kind == "order":
        if not isinstance(payload, dict):
            return Malformed("order: data is not an object")
        order_id = payload.get("order_id")
        if not isinstance(order_id, str | int) or isinstance(order_id, bool) or order_id == "":
            return Malformed("order: no order_id")
        return OrderUpdate(payload)
    if kind == "message":
        return ServerMessage(str(payload))
    return None
