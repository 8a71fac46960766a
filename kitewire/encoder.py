"""The publisher's one hot call: a Kite binary frame in, ready RESP out.

``frame_encoder(channel_prefix).encode(frame, received_at_ns, latest)`` returns
``(publishes, fields, ticks, malformed)``: ``publishes`` holds one
``PUBLISH {prefix}{token} <payload>`` per known packet, in frame order; ``fields`` the same
ticks as ``<token> <payload>`` bulk-string pairs, to follow an ``HSET {ns}:last`` header;
``latest`` (a dict the caller owns) gets each token's newest payload (the last-value
cache). Payloads are exactly ``codec.frame_payloads``' msgpack maps.

Two implementations with identical output, chosen at import: the C speed-up
``kitewire._speedups`` (built by ``pip install`` where a compiler is present) and the
pure-Python ``PyFrameEncoder``. ``KITEBUS_NO_SPEEDUPS=1`` forces the pure-Python one.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from kitewire.codec import _WRITERS, scan_frame

log = logging.getLogger("kitebus.encoder")

PREFIX_CACHE_LIMIT = 100_000  # a server sending endless new tokens cannot grow it forever


class Encoder(Protocol):
    def encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        """One frame -> (its PUBLISHes, its HSET fields, ticks, malformed packets)."""
        ...


def command_header(command: bytes) -> bytes:
    """The RESP array header and command name of a 3-argument command."""
    return b"*3\r\n$%d\r\n%b\r\n" % (len(command), command)


class PyFrameEncoder:
    """The pure-Python encoder: the reference the compiled one must match byte for byte."""

    def __init__(self, channel_prefix: bytes, command: bytes = b"PUBLISH") -> None:
        self._header = command_header(command)
        self._prefix = channel_prefix
        self._heads: dict[int, tuple[bytes, bytes]] = {}  # token -> (PUBLISH head, HSET field name)
        self._bulk = {length: b"$%d\r\n" % w.payload_length for length, w in _WRITERS.items()}

    def encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        packets, malformed = scan_frame(frame)
        heads, writers, bulk = self._heads, _WRITERS, self._bulk
        publishes: list[bytes] = []
        fields: list[bytes] = []
        for layout, offset in packets:
            length = layout.length
            token, payload = writers[length].write(frame, offset, received_at_ns)
            head = heads.get(token)
            if head is None:
                if len(heads) >= PREFIX_CACHE_LIMIT:
                    heads.clear()
                channel = self._prefix + b"%d" % token
                name = b"%d" % token
                head = heads[token] = (
                    self._header + b"$%d\r\n%b\r\n" % (len(channel), channel),
                    b"$%d\r\n%b\r\n" % (len(name), name),
                )
            publishes += (head[0], bulk[length], payload, b"\r\n")
            fields += (head[1], bulk[length], payload, b"\r\n")
            latest[token] = payload
        return b"".join(publishes), b"".join(fields), len(packets), malformed


def _programs() -> dict[int, tuple]:
    """The codec's compiled payload programs, in the shape the C encoder takes."""
    return {
        length: (w.field_offsets, w.price_fields, w.has_ohlc, w.last_k, w.close_k, w.chunks, w.slot_specs)
        for length, w in _WRITERS.items()
    }


def _compiled_class() -> type | None:
    if os.environ.get("KITEBUS_NO_SPEEDUPS", "") not in ("", "0"):
        return None
    try:
        from kitewire import _speedups
    except ImportError:
        return None
    return _speedups.Encoder


_COMPILED = _compiled_class()
SPEEDUPS = _COMPILED is not None  # which path frame_encoder takes, for status and benchmarks


def compiled_encoder(channel_prefix: bytes, command: bytes = b"PUBLISH") -> Encoder | None:
    """The C encoder, or None where it was not built (or is switched off)."""
    if _COMPILED is None:
        return None
    return _COMPILED(_programs(), command, channel_prefix)  # type: ignore[no-any-return]


def frame_encoder(channel_prefix: bytes, command: bytes = b"PUBLISH") -> Encoder:
    """The fastest encoder this installation has."""
    return compiled_encoder(channel_prefix, command) or PyFrameEncoder(channel_prefix, command)
