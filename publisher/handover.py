"""While the lease is lapsed, let go of Kite's sockets if a standby may take over.

Kite allows three sockets per api_key, so a standby that takes over from a leader cut
off from Redis can open its own only once the old leader has closed them. A leader whose
lease lapsed cannot tell an outage of Redis (every publisher is cut off) from a
partition (only it is). It goes by what it last saw: with a standby present within
``STANDBY_MEMORY`` seconds before the lapse, it closes its sockets at once; with none,
it keeps them, so that Kite sees no reconnect and each token's newest tick is ready for
the moment Redis answers. Once the lease is renewed the sockets are opened again, each
with its subscriptions from the book.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from config.keys import Keys
from publisher.connection import KiteConnection
from publisher.health import Health
from publisher.lease import Lease
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.handover")

STANDBY_MEMORY = 10.0  # seconds a standby seen counts as present (it writes {ns}:standby twice a second)
LOOK = 1.0  # seconds between looks for a standby
CHECK = 0.1  # seconds between checks of the lease


class Handover:
    """Owns the task that closes and reopens the connections around a lapse."""

    def __init__(
        self, client: bus.Client, keys: Keys, lease: Lease, connections: Sequence[KiteConnection]
    ) -> None:
        self._redis = client
        self._key = keys.standby
        self._lease = lease
        self._connections = connections
        self.health = Health()  # the publisher's, once it is given one
        self.standby_seen_at = 0.0  # monotonic
        self.released = False  # the sockets are closed for a standby
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            supervised("handover", self._run, self.health, done=self._lease.lost.is_set), name="handover"
        )

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def standby_present(self) -> bool:
        return bool(self.standby_seen_at) and time.monotonic() - self.standby_seen_at < STANDBY_MEMORY

    async def _run(self) -> None:
        looked = 0.0
        while not self._lease.lost.is_set():
            if self._lease.valid():
                if self.released:
                    log.warning("lease renewed: opening the Kite connections again")
                    for connection in self._connections:
                        connection.start()
                    self.released = False
                if time.monotonic() - looked >= LOOK:
                    looked = time.monotonic()
                    await self._look()
                await asyncio.sleep(CHECK)
                continue
            if self.standby_present and not self.released:
                log.warning("lease lapsed with a standby present: closing the Kite connections for it")
                await asyncio.gather(*(connection.close() for connection in self._connections))
                self.released = True
            await self._lease.wait_valid()

    async def _look(self) -> None:
        try:
            async with asyncio.timeout(CHECK * 5):  # a paused Redis must not hold up the next check
                if await self._redis.exists(self._key):
                    self.standby_seen_at = time.monotonic()
        except (*REDIS_FAULTS, TimeoutError):
            pass  # the lease says what an outage means; this only remembers the standby
