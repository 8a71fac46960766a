"""``op rebalance``: even out the connections, make-before-break, as an owned task.

The book picks the tokens to move and counts each on both connections while it moves.
Each moved token is subscribed on its new connection first (the make); its ticks keep
being published from the old one until the new one delivers it (``Moves``), then it is
unsubscribed from the old one (the break) and ``{ns}:token_conn`` names the new one. A
token the new connection does not deliver within ``timeout`` seconds, or whose old
connection is down, is switched anyway. When every move has ended, a follow-up entry
for the request goes to ``{ns}:control:results``: op ``rebalanced``, ``applied`` the
moved tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from config.keys import RESULTS_MAXLEN, Keys
from publisher.connection import LIVE, KiteConnection
from publisher.health import Health
from publisher.lease import Fence
from publisher.moves import Moves
from publisher.subscriptions import ConnectionChange, SubscriptionBook
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import Backoff, cancel_and_wait

log = logging.getLogger("kitebus.rebalance")



class Rebalancer:
    """Owns the task that finishes a rebalance's moves."""

    def __init__(
        self,
        client: bus.Client,
        keys: Keys,
        book: SubscriptionBook,
        connections: Sequence[KiteConnection],
        moves: Moves,
        *,
        timeout: float = 10.0,
        grace: float = 1.0,  # how long the old connection's late packets are still dropped
        fence: Fence | None = None,
        health: Health | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._book = book
        self._connections = connections
        self._moves = moves
        self.timeout = timeout
        self.grace = grace
        self._fence = fence or Fence()
        self._health = health or Health()
        self._finished = False
        self._switched = asyncio.Event()
        moves.on_switch = self._switched.set
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def begin(self, request: str, client: str) -> tuple[int, ...]:
        """Plan the moves and subscribe each token on its new connection; the rest runs in
        the background. Returns the tokens that move. Raises ``RebalanceBusy``."""
        moves, plan = self._book.rebalance()
        for token, (src, dst) in moves.items():
            self._moves.begin(token, src, dst, self._book.in_force[token])
        for index, change in plan.items():
            await self._connections[index].apply(change)
        loads = ",".join(map(str, self._book.loads))
        log.info("rebalance request=%s moving=%d loads=%s", request, len(moves), loads)
        self._finished = False
        self._task = asyncio.create_task(
            supervised("rebalance", lambda: self._finish(request, client, moves), self._health,
                       done=lambda: self._finished),
            name="rebalance",
        )  # fmt: skip
        return tuple(moves)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _finish(self, request: str, client: str, moves: dict[int, tuple[int, int]]) -> None:
        """Break each move once its new connection delivers (or in ``timeout``), then report.
        Run again from the top after a crash: moves that ended are skipped, the others
        taken up again (the book still counts them as moving)."""
        for token, (src, dst) in moves.items():
            if self._book.moving.get(token) == src and self._moves.owner(token) is None:
                self._moves.begin(token, src, dst, self._book.in_force[token])
        pending = dict(moves)
        deadline = time.monotonic() + self.timeout
        try:
            while pending:
                self._switched.clear()
                ready = self._moves.take_switched() & pending.keys()
                late = time.monotonic() >= deadline
                for token, (src, _) in pending.items():
                    if self._book.moving.get(token) != src:  # released meanwhile: nothing to break
                        ready.add(token)
                    elif late or self._connections[src].state != LIVE:
                        self._moves.switch(token)
                        ready.add(token)
                if ready:
                    await self._break({t: pending.pop(t) for t in ready})
                if pending:
                    try:
                        async with asyncio.timeout(min(0.1, max(0.0, deadline - time.monotonic()))):
                            await self._switched.wait()
                    except TimeoutError:
                        pass
            await asyncio.sleep(self.grace)  # the old connections' packets in flight
        except asyncio.CancelledError:
            self._moves.forget(moves)
            raise
        # after a crash the moves stay: their old connections go on publishing until the
        # restarted run takes them up again (forgotten, both would publish each tick)
        self._moves.forget(moves)
        moved = [t for t in moves if self._book.placement.get(t) == moves[t][1]]
        await self._report(request, client, moved)
        self._finished = True

    async def _break(self, ready: dict[int, tuple[int, int]]) -> None:
        """Unsubscribe switched tokens from their old connections; name the new ones."""
        breaks: dict[int, ConnectionChange] = {}
        for token, (src, _) in ready.items():
            change = self._book.finish_move(token, src)
            if change is not None:  # else released (or subscribed anew) meanwhile
                breaks.setdefault(src, ConnectionChange()).unsubscribe.update(change.unsubscribe)
        for src, change in breaks.items():
            await self._connections[src].apply(change)
        moved = {str(t): str(ready[t][1]) for change in breaks.values() for t in change.unsubscribe}
        token_conn = self._keys.token_conn
        if moved and not await self._retried(
            lambda: bus.write(self._redis, self._fence, lambda pipe: pipe.hset(token_conn, mapping=moved))
        ):
            log.warning("token_conn not updated: another publisher leads")

    async def _report(self, request: str, client: str, moved: list[int]) -> None:
        loads = ",".join(map(str, self._book.loads))
        result = {
            "request": request, "op": "rebalanced", "client": client, "ok": "1", "error": "",
            "applied": ",".join(map(str, moved)), "rejected": "", "loads": loads,
        }  # fmt: skip
        results = self._keys.control_results

        def follow_up(pipe: bus.Writes) -> None:
            pipe.xadd(results, result, maxlen=RESULTS_MAXLEN, approximate=True)

        if not await self._retried(lambda: bus.write(self._redis, self._fence, follow_up)):
            log.warning("rebalance follow-up not written request=%s", request)
        log.info("rebalanced request=%s moved=%d loads=%s", request, len(moved), loads)

    async def _retried(self, write: Callable[[], Awaitable[object]]) -> bool:
        """A write retried while Redis is away or says no (a restart, a failover, a full
        server, a resharding) and while the lease is lapsed; False only once another
        publisher leads (the write is then its to make)."""
        backoff = Backoff(0.1, 1.0)
        failed = False
        while True:
            if not self._fence.valid():
                await self._fence.wait_valid()
                if not self._fence.valid():
                    return False
            try:
                await write()
                return True
            except REDIS_FAULTS as exc:
                if not failed:
                    log.warning("rebalance write failed, retrying error=%s", bus.describe(exc))
                failed = True
                await backoff.wait()
