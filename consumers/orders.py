"""Order updates for strategy code, from the stream ``{ns}:orders``, resumable by entry id.

    async with TickSubscriber(url, client="strat-1") as sub:
        async for update in sub.order_updates(after=saved_id):   # None: from now on
            print(update.account, update.order_id, update.status, update.data["filled_quantity"])
            saved_id = update.id

The publisher writes each distinct update Kite sent once, in Kite's order; the reader
goes through the stream after the last entry it gave out, so a Redis reconnect loses
nothing, and a strategy that saved ``update.id`` and restarts gets what came meanwhile
(while the stream still keeps it: about ``ORDERS_MAXLEN`` entries). When the stream no
longer reaches back to that id (trimmed, or Redis lost its data), ``trimmed`` says so and
a warning is logged: reconcile with Kite's orders API then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from config import Keys
from rediswire import bus

log = logging.getLogger("kitebus.orders")


@dataclass(frozen=True)
class OrderUpdate:
    """One order update: ``data`` is Kite's own dict, as ``on_order_update`` gets it."""

    id: str  # the stream entry id: give it as ``after`` to resume after this update
    account: str
    order_id: str
    status: str
    data: dict[str, Any]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class OrderReader:
    """Reads ``{ns}:orders`` after an entry id, for ever, across reconnects. ``after``:
    an entry id (``"0"`` for all the stream keeps), or None for updates from the first
    read on; ``account``: only that account's (others are skipped)."""

    def __init__(
        self,
        client: bus.Client,
        keys: Keys,
        after: str | None = None,
        *,
        account: str | None = None,
        block: float = 1.0,
    ) -> None:
        if after is not None:
            _id_key(after)  # a ValueError now rather than at the first read
        self._redis = client
        self._key = keys.orders
        self.account = account
        # ``last_id``: the entry after which nothing is left to give out, to resume from;
        # ``_cursor``: the last entry read (updates between the two wait in ``_ready``)
        self.last_id = self._cursor = after
        self.block = block
        self.reconnects = 0  # reads that failed and were tried again (Redis away, a failover)
        self.trimmed = False  # entries after ``last_id`` may have been trimmed before they were read
        self.skipped = 0  # entries that are not an order update's (written by hand, say)
        self._ready: deque[OrderUpdate] = deque()
        self._check = after is not None  # look for trimmed entries at the next read

    def __aiter__(self) -> OrderReader:
        return self

    async def __anext__(self) -> OrderUpdate:
        while True:
            update = await self.next(None)
            if update is not None:
                return update

    async def next(self, timeout: float | None = None) -> OrderUpdate | None:
        """The next update, or None after ``timeout`` seconds without one (None: wait)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        backoff = 0.1
        while not self._ready:
            left = self.block if deadline is None else min(self.block, deadline - loop.time())
            if left <= 0:
                return None
            try:
                await self._read(left)
                backoff = 0.1
            except bus.REDIS_FAULTS as exc:  # away, a cluster's failover, or saying no for now
                self.reconnects += 1
                self._check = True
                log.warning("order updates: reading again after %s (%s)", self._cursor, bus.describe(exc))
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
        return self._take()

    def _take(self) -> OrderUpdate:
        update = self._ready.popleft()
        self.last_id = update.id if self._ready else self._cursor
        return update

    async def batch(self, limit: int = 100, wait: float = 1.0) -> list[OrderUpdate]:
        """The updates that have arrived, up to ``limit``, waiting up to ``wait`` s for the first."""
        first = await self.next(wait)
        if first is None:
            return []
        out = [first]
        while self._ready and len(out) < limit:
            out.append(self._take())
        return out

    async def start(self) -> None:
        """Fix where reading begins, now: with ``after=None``, after the newest entry, so
        that every update written from this moment on is read (the first read does this
        by itself). Raises redis-py's errors."""
        if self._cursor is None:
            newest = await self._redis.xrevrange(self._key, count=1)
            self.last_id = self._cursor = newest[0][0].decode() if newest else "0-0"

    async def _read(self, block: float) -> None:
        await self.start()
        if self._check:
            await self._check_trimmed()
        reply = await self._redis.xread({self._key: self._cursor}, count=100, block=max(1, int(block * 1000)))
        for _, entries in reply or ():
            for entry_id, fields in entries:
                self._cursor = entry_id.decode()
                update = self._decode(self._cursor, fields)
                if update is not None and (self.account is None or update.account == self.account):
                    self._ready.append(update)
                elif not self._ready:  # skipped with nothing before it waiting: resume after it
                    self.last_id = self._cursor

    async def _check_trimmed(self) -> None:
        """Does the stream still reach back to ``_cursor``? If it now starts after it, the
        entries between may have been trimmed (or lost with Redis's data)."""
        self._check = False
        if self._cursor is None or _id_key(self._cursor) == (0, 0):
            return
        first = await self._redis.xrange(self._key, count=1)
        if first and _id_key(first[0][0].decode()) > _id_key(self._cursor):
            self.trimmed = True
            log.warning(
                "order updates after %s may be lost: the stream starts at %s now (trimmed, or "
                "Redis lost its data); reconcile with Kite's orders API", self._cursor, first[0][0].decode(),
            )  # fmt: skip

    def _decode(self, entry_id: str, fields: dict[bytes, bytes]) -> OrderUpdate | None:
        try:
            data = json.loads(fields[b"data"])
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return OrderUpdate(
                entry_id, fields[b"account"].decode(), fields[b"order_id"].decode(),
                fields.get(b"status", b"").decode(), data,
            )  # fmt: skip
        except (KeyError, ValueError) as exc:
            self.skipped += 1
            log.warning("order updates: entry %s skipped, not an order update (%s)", entry_id, exc)
            return None


class BlockingOrderReader:
    """``OrderReader`` for synchronous code: iterate it, or ``get(timeout)``. ``call`` runs
    a coroutine on the loop that owns the reader and returns its result."""

    def __init__(self, reader: OrderReader, call: Callable[[Awaitable[Any], float | None], Any]) -> None:
        self.reader = reader
        self._call = call

    @property
    def last_id(self) -> str | None:
        return self.reader.last_id

    def get(self, timeout: float | None = None) -> OrderUpdate:
        """The next update; raises ``queue.Empty`` after ``timeout`` seconds without one."""
        update = self._call(self.reader.next(timeout), None)
        if update is None:
            raise queue.Empty
        return update  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[OrderUpdate]:
        while True:
            yield self.get()
