"""The order updates' writer: every connection's order texts, merged once per account
(``orders.py``), onto ``{ns}:orders``, a capped stream and a channel of the same name.

Each update is one XADD (fields ``account``, ``order_id``, ``status``, ``data``; ``MAXLEN ~``
``ORDERS_MAXLEN``) and one PUBLISH (SPUBLISH on a cluster) of its msgpack map, sent with
the others of its batch as one fenced write (``bus.fenced``: one script that applies them
only while the lease is ours; without a lease, one MULTI/EXEC), so it is on both or on
neither. On a cluster the stream and the channel share a slot: a batch is one script on
one node.

While Redis is away or says no, updates wait in memory, in order, up to ``max_buffered``
updates (the batch being written included) or ``max_bytes``; past that the oldest waiting
is given up, counted and logged. A write whose fate is unknown (the connection dropped
before the answer) is checked against the stream's tail before it is sent again, so an
update is never written twice. Only a leader with a valid lease writes: while it is
lapsed the updates wait, and once it is lost they are given up (the new leader has Kite's
sockets now; Kite replays nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from config.keys import ORDERS_MAXLEN, Keys
from publisher.health import Health
from publisher.lease import Fence
from publisher.orders import HOLD, WINDOW, Every, OrderMerge, Update, prepare
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import Backoff, cancel_and_wait

if TYPE_CHECKING:
    from publisher.connection import KiteConnection

log = logging.getLogger("kitebus.orders")

BATCH = 100  # updates per MULTI/EXEC
Notice = Callable[[str, int, str], None]  # (kind, connection, text): onto {ns}:stream_status


def _no_notice(*_: object) -> None:
    pass


class OrderFeed:
    """Owns the writer task. Connections call ``opened``, ``closed``, ``order``,
    ``malformed`` and ``kite_error`` (synchronous, no I/O)."""

    def __init__(
        self,
        client: bus.Client,
        keys: Keys,
        *,
        cluster: bool = False,
        fence: Fence | None = None,
        notice: Notice | None = None,
        hold: float = HOLD,
        window: int = WINDOW,
        max_buffered: int = 10_000,
        max_bytes: int = 32 << 20,
    ) -> None:
        """``notice``: where Kite's error texts go for consumers (the sink's stream status)."""
        self._redis = client
        self._key = keys.orders
        self._cluster = cluster
        self._fence = fence or Fence()
        self._notice = notice or _no_notice
        self.merge = OrderMerge(window, hold)
        self.max_buffered, self.max_bytes = max_buffered, max_bytes
        self._queue: deque[Update] = deque()
        self._queued_bytes = 0
        self._in_flight: list[Update] = []  # the batch being written (its fate unknown after a failure)
        self._uncertain = False  # the last write failed part way: look at the stream before sending again
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None  # releases held updates when they fall due
        self._task: asyncio.Task[None] | None = None
        self._quiet_bad = Every(1.0)
        self._quiet_given_up = Every(1.0)
        self.health = Health()  # the publisher's, once it is given one
        # figures for status and metrics
        self.received = 0  # order texts taken from Kite, over every socket
        self.published = 0  # distinct updates written (stream and channel)
        self.malformed = 0
        self.given_up = 0
        self.write_errors = 0
        self.last_error = ""
        self.problem = ""  # what keeps updates from Redis now ("" when nothing does)

    # --- the connections' side: synchronous, no I/O ------------------------------------

    def opened(self, connection: KiteConnection) -> None:
        self.merge.opened(connection.account, connection.index)

    def closed(self, connection: KiteConnection) -> None:
        self._enqueue(self.merge.closed(connection.account, connection.index))

    def order(self, connection: KiteConnection, data: dict[str, Any]) -> None:
        """An order text's ``data`` from ``connection``."""
        self.received += 1
        try:
            update = prepare(connection.account, data)
        except ValueError as exc:
            self.malformed_text(connection, f"order {exc}")
            return
        self._enqueue(self.merge.received(connection.index, update, time.monotonic()))
        self._schedule()

    def malformed_text(self, connection: KiteConnection, reason: str) -> None:
        """A text that is not Kite's (not JSON, too big, an order without order_id)."""
        self.malformed += 1
        held_back = self._quiet_bad.allow(time.monotonic())
        if held_back is not None:
            more = f" (and {held_back} more since the last line)" if held_back else ""
            log.warning("malformed text from kite connection=%d reason=%s%s", connection.index, reason, more)

    def kite_error(self, connection: KiteConnection, message: str) -> None:
        """Kite's error text concerns the feed of that socket: consumers hear of it."""
        self._notice("kite_error", connection.index, message[:500])

    # --- the queue ---------------------------------------------------------------------

    @property
    def duplicates(self) -> int:
        return self.merge.duplicates

    @property
    def buffered(self) -> int:
        """Updates not yet written: queued, in flight, or held for the senior socket."""
        return len(self._queue) + len(self._in_flight) + self.merge.held

    def _enqueue(self, updates: list[Update]) -> None:
        if not updates:
            return
        for update in updates:
            self._queue.append(update)
            self._queued_bytes += update.size
        while self._queue and (
            len(self._queue) + len(self._in_flight) > self.max_buffered or self._queued_bytes > self.max_bytes
        ):
            self._give_up(1, "buffer full while redis is away")
        self._wake.set()

    def _give_up(self, count: int, why: str) -> None:
        for _ in range(min(count, len(self._queue))):
            gone = self._queue.popleft()
            self._queued_bytes -= gone.size
            self.given_up += 1
        held_back = self._quiet_given_up.allow(time.monotonic())
        if held_back is not None:
            log.error(
                "order updates given up: %s given_up=%d (reconcile with Kite's orders)", why, self.given_up
            )

    def _schedule(self) -> None:
        """Have held updates released when they fall due."""
        due = self.merge.next_due()
        if due is None or self._timer is not None:
            return
        delay = max(0.0, due - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._release_due)

    def _release_due(self) -> None:
        self._timer = None
        self._enqueue(self.merge.due(time.monotonic()))
        self._schedule()

    # --- the task ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(supervised("orders", self._run, self.health), name="orders")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Release what is held, give the rest ``flush_timeout`` seconds to reach Redis, stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._enqueue(self.merge.due(float("inf")))
        if self._task is None:
            return
        try:
            async with asyncio.timeout(flush_timeout if self._fence.valid() else 0):
                while self._queue or self._in_flight:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        await cancel_and_wait(self._task)
        self._task = None
        unsent = len(self._queue) + len(self._in_flight)
        if unsent:
            self.given_up += unsent
            log.error("stopped with order updates unwritten given_up=%d", unsent)
        self._queue.clear()
        self._in_flight = []
        self._queued_bytes = 0

    async def _run(self) -> None:
        backoff = Backoff(0.1, 1.0)
        while True:
            if not self._in_flight:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                while self._queue and len(self._in_flight) < BATCH:
                    update = self._queue.popleft()
                    self._queued_bytes -= update.size
                    self._in_flight.append(update)
            if not self._fence.valid():
                if self._fence.lapsed:
                    await self._fence.wait_valid()
                    continue
                self._queue.extendleft(reversed(self._in_flight))
                self._queued_bytes += sum(u.size for u in self._in_flight)
                self._in_flight = []
                self._give_up(len(self._queue), "the lease is lost: another publisher leads")
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batch = self._in_flight
                if self._uncertain:  # those the stream already has count as written
                    batch = await self._not_written(batch)
                if batch:
                    await self._write(batch)
            except REDIS_FAULTS as exc:
                self._uncertain = True
                self.write_errors += 1
                if not self.problem:
                    log.warning(
                        "order updates not written yet buffered=%d error=%s", self.buffered, bus.describe(exc)
                    )
                self.problem = self.last_error = bus.describe(exc)
                await backoff.wait()
                continue
            self.published += len(self._in_flight)
            self._in_flight = []
            self._uncertain = False
            if self.problem:
                log.warning("order updates written again buffered=%d", self.buffered)
            self.problem = ""
            backoff.reset()

    async def _write(self, batch: list[Update]) -> None:
        async with bus.fenced(self._redis, self._fence) as pipe:
            for update in batch:
                pipe.xadd(self._key, update.fields(), maxlen=ORDERS_MAXLEN, approximate=True)
                pipe.publish(self._key, update.packed, sharded=self._cluster)
            await pipe.execute()

    async def _not_written(self, batch: list[Update]) -> list[Update]:
        """Of a batch whose write failed, those the stream does not hold: the batch went
        in order, whole or up to a command that failed, and nobody else writes the
        stream, so its written updates are the stream's last entries."""
        tail = await self._redis.xrevrange(self._key, count=len(batch))
        written = {(f.get(b"account", b"").decode(), f.get(b"data", b"").decode()) for _, f in tail}
        return [u for u in batch if (u.account, u.text) not in written]
