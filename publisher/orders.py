"""Order updates: each distinct one once per account, in Kite's order, whichever sockets
carried it. No I/O: values in, values out (``order_feed.py`` is the asyncio shell).

Kite sends an account's order updates on every socket of that account. An update is told
by its *fingerprint*, a digest of its canonical JSON (keys sorted), so two partial fills of
one order, same status but other figures, are two updates, and the copy that a second
socket brings is a duplicate. The last ``window`` fingerprints of each account are kept.

Order: each socket delivers Kite's sequence (or the part of it sent while it was up) in
order, so the *senior* socket, the one of the account that has been up the longest, has
seen everything any other socket of the account has. An update it brings goes out at
once; one that another socket brings first is held until the senior brings it too (then
it goes out in the senior's order), for at most ``hold`` seconds, or until the senior
goes down. So a socket that came back and missed an update never puts the next one
ahead of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

WINDOW = 10_000  # fingerprints kept per account: minutes of updates even at Kite's order rate limit
HOLD = 0.25  # seconds an update first seen off the senior socket waits for it


@dataclass(frozen=True, slots=True)
class Update:
    """One order update, ready to write: the stream entry's fields and the channel's payload."""

    account: str
    order_id: str
    status: str
    text: str  # Kite's object as JSON text: the stream's ``data``
    packed: bytes  # msgpack map of Kite's fields plus ``account``: the channel's payload
    fingerprint: bytes

    @property
    def size(self) -> int:
        return len(self.text) + len(self.packed)

    def fields(self) -> dict[str, str]:
        """The stream entry."""
        return {"account": self.account, "order_id": self.order_id, "status": self.status, "data": self.text}


def prepare(account: str, data: dict[str, Any]) -> Update:
    """An order update's stream entry, channel payload and fingerprint, all made before
    anything is written, so an update is published whole or not at all. Raises ValueError
    when ``data`` cannot be carried (an integer too large for msgpack, say)."""
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        canonical = json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        packed = msgpack.packb({**data, "account": account})
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot be encoded: {exc.__class__.__name__}") from None
    status = data.get("status")
    return Update(
        account=account,
        order_id=str(data["order_id"]),
        status="" if status is None else str(status),
        text=text,
        packed=packed,
        fingerprint=hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
    )


@dataclass
class _Account:
    up: dict[int, None] = field(default_factory=dict)  # sockets up, the longest-up (senior) first
    seen: dict[bytes, None] = field(default_factory=dict)  # fingerprints, oldest first
    held: dict[bytes, tuple[Update, float]] = field(default_factory=dict)  # (update, due), first seen first


class OrderMerge:
    """The merge of an account's sockets into one sequence of distinct updates."""

    def __init__(self, window: int = WINDOW, hold: float = HOLD) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window, self.hold = window, hold
        self._accounts: dict[str, _Account] = {}
        self.duplicates = 0

    def _account(self, name: str) -> _Account:
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = _Account()
        return account

    @property
    def held(self) -> int:
        """Updates waiting for their account's senior socket."""
        return sum(len(a.held) for a in self._accounts.values())

    def opened(self, account: str, socket: int) -> None:
        """``socket`` (a connection index) of ``account`` is up: the youngest of them."""
        up = self._account(account).up
        up.pop(socket, None)
        up[socket] = None

    def closed(self, account: str, socket: int) -> list[Update]:
        """``socket`` went down. If it was the senior, what waited for it goes out now."""
        state = self._account(account)
        senior = next(iter(state.up), None)
        state.up.pop(socket, None)
        if socket != senior or not state.held:
            return []
        out = [update for update, _ in state.held.values()]
        state.held.clear()
        return out

    def received(self, socket: int, update: Update, now: float) -> list[Update]:
        """``update`` arrived on ``socket`` at ``now`` (monotonic seconds): what goes out now,
        in order (empty for a duplicate or an update held)."""
        state = self._account(update.account)
        if socket not in state.up:  # a message before ``opened``: it is up, after all
            state.up[socket] = None
        fingerprint = update.fingerprint
        senior = next(iter(state.up)) == socket
        held = state.held.get(fingerprint)
        if held is not None:
            self.duplicates += 1  # this copy; the first one, held, goes out if this is the senior's
            if not senior:
                return []
            del state.held[fingerprint]
            return [held[0]]
        if fingerprint in state.seen:
            self.duplicates += 1
            return []
        state.seen[fingerprint] = None
        if len(state.seen) > self.window:
            del state.seen[next(iter(state.seen))]
        if senior or self.hold <= 0:
            return [update]
        state.held[fingerprint] = (update, now + self.hold)
        return []

    def due(self, now: float) -> list[Update]:
        """Held updates whose time is up, in the order they were first seen."""
        out: list[Update] = []
        for state in self._accounts.values():
            while state.held:
                fingerprint, (update, due) = next(iter(state.held.items()))
                if due > now:
                    break
                del state.held[fingerprint]
                out.append(update)
        return out

    def next_due(self) -> float | None:
        """When the first held update falls due (None: nothing is held)."""
        dues = [next(iter(s.held.values()))[1] for s in self._accounts.values() if s.held]
        return min(dues, default=None)

    def accounts(self) -> Iterator[str]:
        return iter(self._accounts)


class Every:
    """Lets a thing happen at most once every ``seconds`` (a log line), and counts what it
    held back meanwhile."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self._last = float("-inf")
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """The number held back since the last allowed one, or None: not now."""
        if now - self._last < self.seconds:
            self.suppressed += 1
            return None
        self._last = now
        held_back, self.suppressed = self.suppressed, 0
        return held_back
