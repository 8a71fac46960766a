"""Keep a process's session claims alive: write ``{ns}:client_heartbeat`` while it runs.

The publisher releases every claim of a session client whose heartbeat has been silent
for its timeout (op ``expire``), so claims made through the library die with their
process. A beat is a plain HSET of the time, every third of the timeout; a failed one
(Redis away, a Sentinel failover) is tried again every second until Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from config import Keys
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.heartbeat")

RETRY = 1.0  # seconds between tries while Redis does not answer


class Heartbeat:
    """The heartbeat of some client ids, from a task of its own in the running loop.

    ``add(client)`` starts it (on the first call); ``aclose()`` stops it and deletes the
    clients' heartbeats, so a clean exit leaves nothing behind.
    """

    def __init__(self, client: bus.Client, keys: Keys, timeout: float) -> None:
        self._redis = client
        self._key = keys.client_heartbeat
        self.timeout = timeout
        self.interval = timeout / 3
        self.clients: set[str] = set()
        self.beats = 0  # heartbeats written
        # run after a beat that followed a silence of a whole timeout: the publisher may
        # have expired the claims meanwhile (this process cut off from Redis alone)
        self.on_resumed: list[Callable[[], Awaitable[object]]] = []
        self._task: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[None] | None = None

    def add(self, client: str) -> None:
        """Beat for ``client`` too, from now on (starts the task in the running loop)."""
        self.clients.add(client)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kitebus-heartbeat")

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop beating and delete these clients' heartbeats (best effort, within ``timeout``)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await cancel_and_wait(self._resuming)
        self._resuming = None
        if not self.clients:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._redis.hdel(self._key, *sorted(self.clients))
        except (*REDIS_FAULTS, TimeoutError) as exc:  # the publisher deletes it once it is old
            names = ",".join(sorted(self.clients))
            log.info("heartbeat not deleted clients=%s error=%s", names, bus.describe(exc))
        self.clients.clear()

    async def _run(self) -> None:
        failing_since = 0.0
        # wall time of the last beat written: a process stopped (SIGSTOP), suspended or
        # blocked raises nothing, it just comes back to a gap between two beats
        beat_at = 0.0
        while True:
            try:
                async with asyncio.timeout(max(self.interval, RETRY)):  # a hung socket is a failed beat
                    stamp = f"{time.time():.3f}"
                    if self.clients:
                        await self._redis.hset(self._key, mapping=dict.fromkeys(sorted(self.clients), stamp))
            except Exception as exc:  # never the end of the heartbeat: the claims depend on it
                if not failing_since:
                    failing_since = time.monotonic()
                    why = bus.describe(exc) if isinstance(exc, (*REDIS_FAULTS, TimeoutError)) else repr(exc)
                    log.warning("heartbeat failed (claims are released after %gs without one) error=%s",
                                self.timeout, why, exc_info=not isinstance(exc, REDIS_FAULTS))  # fmt: skip
                await asyncio.sleep(min(self.interval, RETRY))
                continue
            self.beats += 1
            now = time.time()
            silent = now - beat_at if beat_at else 0.0
            beat_at = now
            if failing_since or silent >= self.timeout:
                level = logging.WARNING if silent >= self.timeout else logging.INFO
                log.log(level, "heartbeat written again after %.1fs (timeout %gs)", silent, self.timeout)
                failing_since = 0.0
            if silent >= self.timeout and self.on_resumed and not self._resuming_now():
                # in a task of its own: the beats go on while the claims are made again
                self._resuming = asyncio.create_task(self._resumed(), name="kitebus-claim-again")
            await asyncio.sleep(self.interval)

    def _resuming_now(self) -> bool:
        return self._resuming is not None and not self._resuming.done()

    async def _resumed(self) -> None:
        for callback in list(self.on_resumed):
            try:
                await callback()
            except Exception:  # one owner's failure is not the heartbeat's end
                log.exception("claiming again after a silent heartbeat failed")
