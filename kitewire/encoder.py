"""The publisher's one hot call: a Kite binary frame in, ready RESP out.

``frame_encoder(channel_prefix).encode(frame, received_at_ns, latest)`` returns
``(publishes, fields, ticks, malformed)``: ``publishes`` holds one
``PUBLISH {prefix}{token} <payload>`` per known packet, in frame order; ``fields`` the same
ticks as ``<token> <payload>`` bulk-string pairs, to follow an ``HSET {ns}:last`` header;
``latest`` (a dict the caller owns) gets each token's newest payload (the last-value
cache). Payloads are msgpack maps of ``codec.decode_frame``'s tick plus ``received_at_ns``,
``seq``, the token's sequence number (1, 2, 3, …), and ``epoch``, the publisher's epoch
id, so a consumer can tell a gap (seq jumps) from a restart (epoch changes).

State is bounded by the tokens claimed. ``set_claimed(container)`` names the tokens whose
packets are published (``None``: all); a packet of any other token is skipped and counted
in ``unclaimed`` (one membership test per packet). ``release(tokens)`` forgets released
tokens' sequence numbers, so a token claimed again starts at ``seq`` 1; ``tracked()`` is
how many tokens the sequence table holds.

Two implementations with identical output, chosen at import: the C speed-up
``kitewire._speedups`` (built by ``pip install`` where a compiler is present) and the
pure-Python ``PyFrameEncoder``. ``KITEBUS_NO_SPEEDUPS=1`` forces the pure-Python one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Container, Iterable
from typing import Protocol

from kitewire.codec import PAYLOAD_WRITERS, scan_frame, token_at

log = logging.getLogger("kitebus.encoder")

PREFIX_CACHE_LIMIT = 100_000  # a server sending endless new tokens cannot grow it forever


class Encoder(Protocol):
    def encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        """One frame -> (its PUBLISHes, its HSET fields, ticks, malformed packets)."""
        ...

    unclaimed: int  # packets skipped since the encoder was made: their token was not claimed

    def set_claimed(self, claimed: Container[int] | None) -> None:
        """Publish only packets of tokens in ``claimed`` (kept by reference); None: all."""
        ...

    def release(self, tokens: Iterable[int]) -> None:
        """Forget the tokens' sequence numbers (and cached channel names)."""
        ...

    def tracked(self) -> int:
        """Tokens in the sequence table."""
        ...


def command_header(command: bytes) -> bytes:
    """The RESP array header and command name of a 3-argument command. RESP is built in
    ``rediswire/resp.py``; the encoder, below that floor and fused for speed, writes the
    few pieces it needs itself, and its tests read them back with ``resp.Replies``."""
    return b"*3\r\n$%d\r\n%b\r\n" % (len(command), command)


class PyFrameEncoder:
    """The pure-Python encoder: the reference the compiled one must match byte for byte."""

    def __init__(self, channel_prefix: bytes, command: bytes = b"PUBLISH", epoch: int = 0) -> None:
        if getattr(self, "_busy", False):
            self._refuse_if_busy()
        self._header = command_header(command)
        self._epoch = epoch
        self._seqs: dict[int, int] = {}  # token -> the last sequence number given
        self._prefix = channel_prefix
        self._heads: dict[int, tuple[bytes, bytes]] = {}  # token -> (PUBLISH head, HSET field name)
        self._bulk = {length: b"$%d\r\n" % w.payload_length for length, w in PAYLOAD_WRITERS.items()}
        self._claimed: Container[int] | None = None
        self.unclaimed = 0
        self._busy = False  # inside encode(): refuse the calls the compiled encoder refuses

    def _refuse_if_busy(self) -> None:
        if self._busy:
            raise RuntimeError("the encoder was called from inside its own encode()")

    def set_claimed(self, claimed: Container[int] | None) -> None:
        self._refuse_if_busy()
        self._claimed = claimed

    def release(self, tokens: Iterable[int]) -> None:
        self._refuse_if_busy()
        for token in tokens:
            self._seqs.pop(token, None)
            self._heads.pop(token, None)

    def tracked(self) -> int:
        return len(self._seqs)

    def encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        self._refuse_if_busy()
        if type(frame) is not bytes:  # a copy: Python code run inside the call may change it
            frame = bytes(memoryview(frame))
        self._busy = True
        try:
            return self._encode(frame, received_at_ns, latest)
        finally:
            self._busy = False

    def _encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        packets, malformed = scan_frame(frame)
        heads, writers, bulk = self._heads, PAYLOAD_WRITERS, self._bulk
        seqs, epoch, claimed = self._seqs, self._epoch, self._claimed
        publishes: list[bytes] = []
        fields: list[bytes] = []
        ticks = 0
        for layout, offset in packets:
            length = layout.length
            token = token_at(frame, offset)
            if claimed is not None and token not in claimed:
                self.unclaimed += 1
                continue
            ticks += 1
            seq = seqs[token] = seqs.get(token, 0) + 1
            _, payload = writers[length].write(frame, offset, received_at_ns, seq, epoch)
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
        return b"".join(publishes), b"".join(fields), ticks, malformed


def _programs(writers: dict = PAYLOAD_WRITERS) -> dict[int, tuple]:
    """The codec's compiled payload programs, in the shape the C encoder takes."""
    return {
        length: (w.field_offsets, w.price_fields, w.has_ohlc, w.last_k, w.close_k, w.chunks, w.slot_specs)
        for length, w in writers.items()
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


def compiled_encoder(channel_prefix: bytes, command: bytes = b"PUBLISH", epoch: int = 0) -> Encoder | None:
    """The C encoder, or None where it was not built (or is switched off)."""
    if _COMPILED is None:
        return None
    return _COMPILED(_programs(), command, channel_prefix, epoch)  # type: ignore[no-any-return]


def frame_encoder(channel_prefix: bytes, command: bytes = b"PUBLISH", epoch: int = 0) -> Encoder:
    """The fastest encoder this installation has."""
    return compiled_encoder(channel_prefix, command, epoch) or PyFrameEncoder(channel_prefix, command, epoch)
