"""Tokens moving between connections in a rebalance: whose ticks of each are published.

A moving token is subscribed on both its old connection (``src``) and its new one
(``dst``) for a moment. Its ticks are published from exactly one of them at any time:
from ``src`` until ``dst`` delivers its first packet of the token in the mode in force
(a plain subscribe streams quote until the mode message lands), from ``dst`` after.
That first packet is published too, unless it is byte for byte the packet ``src`` last
published (the same tick, heard twice). After the switch, whatever ``src`` still sends
of the token is dropped, until the move is ended: Kite sends every tick to each
connection that holds the token, so a tick newer than the switch comes from ``dst`` as
well, and an older one is superseded by the first packet ``dst`` published.

This runs on the hot path, but only while a move is in progress: a connection's frames
go straight to the sink when nothing moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kitewire.codec import LAYOUTS, drop_packets

FrameHandler = Callable[[bytes, int], int]


@dataclass(slots=True)
class _Move:
    src: int
    dst: int
    mode: str  # in force: dst's packets in another mode do not count
    owner: int  # the connection whose packets of the token are published
    last: bytes = b""  # the last packet published from src


class Moves:
    """The moves in progress, shared by every connection's frame handler."""

    def __init__(self) -> None:
        self._moves: dict[int, _Move] = {}
        self.switched: set[int] = set()  # tokens switched to dst since the last ``take_switched``
        self.on_switch: Callable[[], None] = lambda: None

    def __bool__(self) -> bool:
        return bool(self._moves)

    def begin(self, token: int, src: int, dst: int, mode: str) -> None:
        """Call before ``dst`` is told to subscribe the token."""
        self._moves[token] = _Move(src, dst, mode, src)

    def set_mode(self, token: int, mode: str) -> None:
        """The token's mode in force changed in the middle of its move."""
        move = self._moves.get(token)
        if move is not None:
            move.mode = mode

    def switch(self, token: int) -> None:
        """Publish from ``dst`` from now on (the first packet did not come in time, or
        ``src`` is down)."""
        move = self._moves.get(token)
        if move is not None:
            move.owner = move.dst

    def owner(self, token: int) -> int | None:
        move = self._moves.get(token)
        return None if move is None else move.owner

    def take_switched(self) -> set[int]:
        switched, self.switched = self.switched, set()
        return switched

    def forget(self, tokens: Iterable[int]) -> None:
        """End these moves at once (the tokens were subscribed or released anew)."""
        for token in tokens:
            self._moves.pop(token, None)

    def handler(self, index: int, publish: FrameHandler) -> FrameHandler:
        """Connection ``index``'s frame handler: ``publish`` after dropping what it must not."""

        def handle(frame: bytes, received_at_ns: int) -> int:
            if self._moves:
                frame = drop_packets(frame, lambda token, body: not self._publishes(index, token, body))
            return publish(frame, received_at_ns)

        return handle

    def _publishes(self, index: int, token: int, body: bytes) -> bool:
        move = self._moves.get(token)
        if move is None or index not in (move.src, move.dst):
            return True
        if index == move.owner:
            if index == move.src:
                move.last = body
            return True
        if index == move.dst:  # dst's first packet: it has caught up
            if LAYOUTS[len(body)].mode != move.mode:
                return False
            move.owner = index
            self.switched.add(token)
            self.on_switch()
            return body != move.last
        return False  # src, after the switch
