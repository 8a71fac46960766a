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
publishes. Redis checks too, since a leader can freeze between its check and its write:
every state write (claims, hashes, results, acknowledgements, status) carries the lease
(``guard``, ``bus.OrderedWrites``) and is refused unless ``{ns}:leader`` still holds
this term's value (on a cluster: unless no higher fence wrote to the slot); a refusal
ends the term at once (``depose``). The tick flow is checked by the leader alone. A
lease that was not renewed in time has *lapsed*: the leader writes nothing and publishes
nothing, but keeps its book and keeps trying to renew; it is *lost* only when Redis
answers that another publisher holds the key. So an outage of Redis alone (down, paused,
restarted empty) costs no claim: the leader renews (or takes the key back) as soon as
Redis answers, and carries on from its own book. A standby that itself lost sight of
Redis waits ``ttl`` after Redis answers it again before it takes a free key
(``standby.py``), so the leader it could not see has the first chance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from config.keys import Keys
from publisher.health import Health
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import cancel_and_wait

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


RETRY = 0.2  # seconds between renewals while the lease is lapsed


class LeaseLost(Exception):
    """This publisher no longer leads its namespace."""


class Fence:
    """What a writer asks before it writes: may this publisher write now? The one of a
    publisher without a lease always says yes."""

    def valid(self) -> bool:
        return True

    @property
    def lapsed(self) -> bool:
        return False

    async def wait_valid(self) -> None:
        """Return once writes are allowed again, or the lease is lost for good."""

    def guard(self) -> bus.Guard | None:
        """What Redis is to check before it applies this publisher's state writes (None:
        nothing, there is no lease)."""
        return None

    async def depose(self, why: str, seen: int | None = None) -> None:
        """Redis refused a write: another publisher leads (``seen``: its fence, if known)."""

    def renew_soon(self) -> None:
        """Redis refused a write for want of any lease (it lost its data): renew now."""


class Lease(Fence):
    """``await acquire()`` until it is True; then ``start()`` renews it; ``lost`` is set
    once another publisher holds it."""

    def __init__(self, client: bus.Client, keys: Keys, ttl: float = 3.0) -> None:
        self._redis = client
        self._keys = keys
        self.key = keys.leader
        self._fence_key = f"{keys.ns}:leader_fence"
        self.ttl = ttl
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.value = ""
        self.fence = 0
        self.since = 0.0  # epoch seconds this term began
        self._trusted_until = 0.0  # monotonic
        self.lost = asyncio.Event()
        self.lapses = 0  # times the lease lapsed and was renewed or lost after
        self._lapsed_at = 0.0  # monotonic; 0 while the lease is trusted
        self._renewed = asyncio.Event()  # set on each renewal, and when the lease is lost
        self._renew_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def valid(self) -> bool:
        """True while no other publisher can have taken the lease."""
        if time.monotonic() < self._trusted_until:
            return True
        if self.value and not self._lapsed_at and not self.lost.is_set():
            log.error("lease lapsed (not renewed in time): writes paused until renewed fence=%d", self.fence)
            self._lapsed_at = time.monotonic()
            self.lapses += 1
        return False

    @property
    def lapsed(self) -> bool:
        """Not renewed in time, and not (yet) known to be lost."""
        return not self.valid() and not self.lost.is_set()

    @property
    def lapsed_for(self) -> float:
        """Seconds since the lease lapsed (0 while it is trusted)."""
        return time.monotonic() - self._lapsed_at if self._lapsed_at and not self.valid() else 0.0

    async def wait_valid(self) -> None:
        while True:
            self._renewed.clear()
            if self.valid() or self.lost.is_set():
                return
            await self._renewed.wait()

    def _lose(self, why: str) -> None:
        log.error("%s: stepping down fence=%d", why, self.fence)
        self._trusted_until = 0.0
        self.lost.set()
        self._renewed.set()

    def renew_soon(self) -> None:
        self._renew_now.set()

    def guard(self) -> bus.Guard:
        return bus.Guard(self._keys, self.value, self.fence)

    async def depose(self, why: str, seen: int | None = None) -> None:
        if self.lost.is_set():
            return
        self._lose(why)
        if seen is not None and seen > self.fence:
            # the fence counter may have been lost (a cluster node restarted empty) while
            # a slot kept a higher fence: the next term must be numbered above it
            try:
                await self._redis.eval(_FENCE_AT_LEAST, 1, self._fence_key, seen)
            except REDIS_FAULTS:
                pass  # then the next leader is refused once more, and this is tried again

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (absent, or released by a clean stop)."""
        fence = await self._redis.incr(self._fence_key)
        value = f"{fence}:{self.identity}"
        sent = time.monotonic()
        if not await self._redis.eval(_ACQUIRE, 1, self.key, value, int(self.ttl * 1000)):
            return False
        self.value, self.fence, self.since = value, fence, time.time()
        self._trusted_until = sent + self.ttl * TRUST
        self._lapsed_at = 0.0
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
        if self._lapsed_at and self.valid():
            lapse = time.monotonic() - self._lapsed_at
            log.warning("lease renewed after a lapse of %.1fs fence=%d", lapse, self.fence)
            self._lapsed_at = 0.0
        self._renewed.set()
        return True

    def start(self, health: Health | None = None) -> None:
        """Renew until closed; a crash of the renewal is recorded in ``health``."""
        self._task = asyncio.create_task(
            supervised("lease", self._run, health or Health(), done=self.lost.is_set), name="lease"
        )

    async def _run(self) -> None:
        failing = False
        while not self.lost.is_set():
            try:
                async with asyncio.timeout(self.ttl / 3 if self.valid() else RETRY):
                    await self._renew_now.wait()
            except TimeoutError:
                pass
            self._renew_now.clear()
            try:
                if not await self.renew():
                    self._lose("lease taken by another publisher")
                    return
                failing = False
            except REDIS_FAULTS as exc:  # lapses (valid() says so) if this lasts; never ends the term
                if not failing:
                    log.warning("lease not renewed (retrying) error=%s", bus.describe(exc))
                failing = True

    async def close(self, *, release: bool) -> None:
        """Stop renewing; ``release`` hands the lease over at once (a clean stop)."""
        await cancel_and_wait(self._task)
        self._task = None
        if release and self.valid():
            try:
                await self._redis.eval(_RELEASE, 1, self.key, self.value, int(self.ttl * 1000))
            except REDIS_FAULTS:
                pass  # it expires by itself
        self.value = ""
