"""A publisher that does not lead: it opens no Kite connection, says so in
``{ns}:standby``, and takes the lease as soon as nobody holds it.

It will not take over a namespace whose leader runs other settings (connections,
tokens per connection): its capacity would be wrong. It refuses while that leader holds
the lease, and while its status still says ``running`` with a heartbeat younger than
``MISMATCH_GRACE`` seconds (it just died); after that it takes over, loudly, since a
leader gone that long was replaced on purpose.

After it lost sight of Redis (an error, or a reply that took over ``STALL`` seconds: a
paused server) it takes no free lease for ``ttl`` seconds once Redis answers again: the
leader kept its book through the outage and takes its lease back at its first renewal,
whereas the standby would start from what Redis holds, which after a restart is nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from config import Keys, Settings
from config.keys import SERVING
from publisher.lease import Lease
from rediswire import bus
from rediswire.bus import REDIS_FAULTS

log = logging.getLogger("kitebus.standby")

POLL = 0.5  # seconds between tries of the lease
PRESENCE_TTL = 5.0  # {ns}:standby lapses this long after the standby stops writing it
MISMATCH_GRACE = 30.0
STALL = 1.0  # seconds: a lease read slower than this means Redis was paused


class Standby:
    """``await wait_for_lease(stop)`` is True once this process leads, False on ``stop``."""

    def __init__(self, client: bus.Client, settings: Settings, lease: Lease) -> None:
        self._redis = client
        self._settings = settings
        self._keys = Keys(settings.namespace)
        self._lease = lease
        self.key = self._keys.standby
        self.since = 0.0
        self.refusing = ""
        self._said = 0.0

    async def wait_for_lease(self, stop: asyncio.Event) -> bool:
        self.since = time.time()
        first = True
        expires_at = 0.0  # monotonic: when the leader's key, as last seen, would expire
        vanished_at = 0.0  # monotonic: when the key was first seen gone before its time
        blind = False  # Redis was out of sight since the last look
        wait_until = 0.0  # monotonic: no free lease is taken before (the leader goes first)
        while not stop.is_set():
            try:
                asked = time.monotonic()
                holder, left = await self._lease.holder()
                now = time.monotonic()
                if blind or now - asked > STALL:
                    wait_until, blind = now + self._lease.ttl, False
                    log.warning("redis is back: the leader goes first for %.1fs", self._lease.ttl)
                if holder is not None and holder != "released":
                    expires_at, vanished_at = now + left, 0.0
                elif holder is None and now < expires_at and not vanished_at:
                    vanished_at = now  # gone early: Redis lost it; its leader may still be at work
                    log.warning("the leader's lease vanished early (redis lost its data?): waiting")
                free = holder == "released" or (
                    holder is None and (not vanished_at or now - vanished_at >= self._lease.ttl)
                )  # a vanished lease is free once its leader can no longer trust it
                free = free and (holder == "released" or now >= wait_until)
                self.refusing = self._mismatch(await self._redis.hgetall(self._keys.status), holder)
                if not self.refusing and free and await self._lease.acquire():
                    await self._redis.delete(self.key)
                    return True
                if first and holder:
                    log.warning("standing by: %s leads", holder)
                first = False
                await self._say_present()
            except REDIS_FAULTS as exc:
                if not blind:
                    log.warning("standby cannot reach redis error=%s", bus.describe(exc))
                blind = True
            try:
                async with asyncio.timeout(POLL):
                    await stop.wait()
            except TimeoutError:
                pass
        return False

    def _mismatch(self, status: dict[bytes, bytes], holder: str | None) -> str:
        """Why this process must not take over now ("" if it may)."""
        if not status or status.get(b"state", b"").decode() not in SERVING:
            return ""
        theirs = (status.get(b"connections", b"").decode(), status.get(b"capacity", b"").decode())
        ours = (str(self._settings.total_connections), str(self._settings.capacity))
        if theirs == ours:
            return ""
        age = time.time() - float(status.get(b"heartbeat_at", b"0") or 0)
        reason = (
            f"the leader runs {theirs[0]} connections for {theirs[1]} tokens, "
            f"this publisher {ours[0]} for {ours[1]}: start it with the same settings"
        )
        if holder in (None, "released") and age > MISMATCH_GRACE:
            log.error("taking over although %s (the leader has been gone %.0fs)", reason, age)
            return ""
        if time.monotonic() - self._said > 30:
            log.error("will not take over: %s", reason)
            self._said = time.monotonic()
        return reason

    async def _say_present(self) -> None:
        fields = {
            "pid": str(os.getpid()), "host": socket.gethostname(), "since": f"{self.since:.3f}",
            "heartbeat_at": f"{time.time():.3f}", "refusing": self.refusing,
        }  # fmt: skip
        async with bus.pipeline(self._redis) as pipe:
            pipe.hset(self.key, mapping=fields)
            pipe.pexpire(self.key, int(PRESENCE_TTL * 1000))
            await pipe.execute()
