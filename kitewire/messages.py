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


ServerEvent = ServerError | OrderUpdate | ServerMessage


def parse_server_text(text: str | bytes) -> ServerEvent | None:
    """Parse a server text frame; anything unknown or not JSON gives None, never an exception."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    kind, payload = data.get("type"), data.get("data")
    if kind == "error":
        return ServerError(str(payload))
    if kind == "order" and isinstance(payload, dict):
        return OrderUpdate(payload)
    if kind == "message":
        return ServerMessage(str(payload))
    return None
