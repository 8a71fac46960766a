"""Leadership of a namespace: one publisher holds Kite's connections, any other stands by.

The leader holds ``{ns}:leader``, a string ``<fence>:<host>:<pid>`` that expires ``ttl``
seconds after its last renewal; it renews every ``ttl / 3``. The fence comes from
``INCR {ns}:leader_fence``, so every term of leadership has a number larger than the
last. A standby opens no Kite connection: it only tries to take the key when it is gone.
If the key vanished before its time (Redis restarted without its data), the leader takes
it back at its next renewal, and a standby waits a full ``ttl`` before it may take it.
A clean stop leaves the key saying ``released``, and a standby takes over at once.

A leader trusts its lease only for ``0.8 * ttl`` from the moment it *sent* its last
successful renewal (``valid``): the key cannot have expired before, so no other
publisher can lead yet. It checks before every write to Redis and every frame it
publishes; a leader cut off from Redis, or frozen (SIGSTOP) and woken after its lease
ran out, finds it invalid at once, before the renewal task has even run, and steps down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from config.keys import Keys
from publisher import bus
from publisher.bus import REDIS_DOWN
from publisher.tasks import cancel_and_wait

log = logging.getLogger("kitebus.lease")

# Renew our lease (1); if the key is gone (Redis lost its data) take it back at once (2),
# before a standby may (it waits a full ttl when a key vanishes early). 0 when another
# publisher holds it. One key per script: on a cluster the two keys sit in different slots.
_RENEW = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if v then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""
# After a lease was taken back: the fence counter at least at our fence, so the next term's
# fence is larger than ours.
_FENCE_AT_LEAST = """
if tonumber(redis.call('get', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1])
end
return 1
"""
# A clean stop: the key says "released" for a moment, so a standby takes over at once.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], 'released', 'PX', ARGV[2]) end
return 0
"""
_ACQUIRE = """
local v = redis.call('get', KEYS[1])
if v and v ~= 'released' then return 0 end
return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
"""
TRUST = 0.8  # of the ttl, from the sending of the last successful renewal


class LeaseLost(Exception):
    """This publisher no longer leads its namespace."""


class Lease:
    """``await acquire()`` until it is True; then ``start()`` renews it and sets ``lost``."""

    def __init__(self, client: bus.Client, keys: Keys, ttl: float = 3.0) -> None:
        self._redis = client
        self.key = keys.leader
        self._fence_key = f"{keys.ns}:leader_fence"
        self.ttl = ttl
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.value = ""
        self.fence = 0
        self.since = 0.0  # epoch seconds this term began
        self._trusted_until = 0.0  # monotonic
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def valid(self) -> bool:
        """True while no other publisher can have taken the lease."""
        if time.monotonic() < self._trusted_until:
            return True
        if self.value and not self.lost.is_set():
            log.error("lease lapsed (not renewed in time): stepping down fence=%d", self.fence)
            self.lost.set()
        return False

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (absent, or released by a clean stop)."""
        fence = await self._redis.incr(self._fence_key)
        value = f"{fence}:{self.identity}"
        sent = time.monotonic()
        if not await self._redis.eval(_ACQUIRE, 1, self.key, value, int(self.ttl * 1000)):
            return False
        self.value, self.fence, self.since = value, fence, time.time()
        self._trusted_until = sent + self.ttl * TRUST
        self.lost.clear()
        log.warning("leading fence=%d", fence)
        return True

    async def holder(self) -> tuple[str | None, float]:
        """``<fence>:<host>:<pid>`` of the current leader (None if there is none; "released"
        just after a clean stop) and the seconds its key has left."""
        async with bus.pipeline(self._redis) as pipe:
            value, pttl = await pipe.get(self.key).pttl(self.key).execute()
        return (value.decode() if value else None), max(pttl, 0) / 1000

    async def renew(self) -> bool:
        sent = time.monotonic()
        ttl_ms = int(self.ttl * 1000)
        renewed = await self._redis.eval(_RENEW, 1, self.key, self.value, ttl_ms)
        if not renewed:
            return False
        if renewed == 2:
            await self._redis.eval(_FENCE_AT_LEAST, 1, self._fence_key, self.fence)
        self._trusted_until = sent + self.ttl * TRUST
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease")

    async def _run(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self.ttl / 3)
            if not self.valid():
                return
            try:
                if not await self.renew():
                    log.error("lease taken by another publisher: stepping down fence=%d", self.fence)
                    self.lost.set()
            except REDIS_DOWN as exc:  # valid() ends the term if this lasts
                log.warning("lease not renewed error=%s", exc.__class__.__name__)

    async def close(self, *, release: bool) -> None:
        """Stop renewing; ``release`` hands the lease over at once (a clean stop)."""
        await cancel_and_wait(self._task)
        self._task = None
        if release and self.valid():
            try:
                await self._redis.eval(_RELEASE, 1, self.key, self.value, int(self.ttl * 1000))
            except REDIS_DOWN:
                pass  # it expires by itself
        self.value = ""
