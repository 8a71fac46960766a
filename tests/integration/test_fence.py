"""The leader's state writes carry its lease, and Redis refuses them from a deposed leader:
the scripts of ``rediswire.bus.OrderedWrites`` on a real redis-server, and a leader frozen
between its own check of the lease and its write."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as redis

from config import Keys
from config.keys import CONTROL_GROUP
from publisher import app
from publisher.app import Publisher, Tuning
from publisher.lease import Lease
from rediswire import bus
from tests.integration.conftest import eventually

KEYS = Keys("kite")
OURS = "5:here:1"


class StubFence:
    """A fence whose guard says lease ``value`` and ``fence``; notes what Redis told it."""

    def __init__(self, value: str = OURS, fence: int = 5) -> None:
        self.value, self.fence = value, fence
        self.deposed: list[tuple[str, int | None]] = []
        self.renewals = 0

    def guard(self) -> bus.Guard:
        return bus.Guard(KEYS, self.value, self.fence)

    async def depose(self, why: str, seen: int | None = None) -> None:
        self.deposed.append((why, seen))

    def renew_soon(self) -> None:
        self.renewals += 1


def _batch(rds: redis.Redis, fence: StubFence) -> bus.OrderedWrites:
    """State, results and XACK, as a control batch writes them; the claim hash longer than
    a script may unpack in one go."""
    writes = bus.OrderedWrites(rds, 3, fence)
    writes.stages[0].delete(KEYS.claims("c"))
    writes.stages[0].hset(KEYS.claims("c"), mapping={str(t): "ltp" for t in range(5000)})
    writes.stages[0].sadd(KEYS.clients, "c")
    writes.stages[0].hset(KEYS.client_activity, "c", "1.5")
    writes.stages[1].xadd(KEYS.control_results, {"request": "1-1", "ok": "1"}, maxlen=10, approximate=True)
    writes.stages[2].xack(KEYS.control, "publisher", "1-1")
    return writes


async def _written(rds: redis.Redis) -> tuple[int, bool, int]:
    claims, results = await rds.hlen(KEYS.claims("c")), await rds.xlen(KEYS.control_results)
    return claims, await rds.exists(KEYS.clients) == 1, results


async def test_the_leaders_writes_apply_while_the_lease_is_its_own(redis_url: str) -> None:
    rds = redis.from_url(redis_url)
    try:
        await rds.set(KEYS.leader, OURS)
        await rds.script_flush()  # NOSCRIPT first: the script is sent whole
        fence = StubFence()
        for _ in range(2):  # then by its sha
            await _batch(rds, fence).execute()
        assert await _written(rds) == (5000, True, 2) and not fence.deposed
        assert await rds.hget(KEYS.client_activity, "c") == b"1.5"
    finally:
        await rds.aclose()


@pytest.mark.parametrize(("holder", "seen"), [("6:there:2", 6), ("released", None)])
async def test_writes_are_refused_once_another_holds_the_lease(redis_url: str, holder: str, seen) -> None:
    rds = redis.from_url(redis_url)
    try:
        await rds.set(KEYS.leader, holder)
        fence = StubFence()
        with pytest.raises(bus.Deposed, match=f"DEPOSED {holder}"):
            await _batch(rds, fence).execute()
        assert await _written(rds) == (0, False, 0)  # nothing of any stage
        assert [s for _, s in fence.deposed] == [seen]
    finally:
        await rds.aclose()


async def test_a_lease_redis_lost_holds_the_writes_back_without_deposing(redis_url: str) -> None:
    """Redis restarted empty: the leader takes its lease back at its next renewal; until
    then its writes are refused as Redis saying no (retried), not as a deposition."""
    rds = redis.from_url(redis_url)
    try:
        fence = StubFence()
        with pytest.raises(redis.ResponseError, match="NOLEASE") as refused:
            await _batch(rds, fence).execute()
        assert not isinstance(refused.value, bus.Deposed) and not fence.deposed
        assert fence.renewals == 1  # the lease is to be taken back at once
        assert isinstance(refused.value, bus.REDIS_FAULTS)
        assert await _written(rds) == (0, False, 0)
    finally:
        await rds.aclose()


async def test_an_out_of_memory_redis_applies_none_of_a_batch(redis_url: str) -> None:
    """A DEL ahead of an HSET: a script Redis let start would apply the DEL and fail at the
    HSET. ``#!lua`` has Redis refuse the script whole."""
    rds = redis.from_url(redis_url)
    try:
        await rds.set(KEYS.leader, OURS)
        await rds.hset(KEYS.claims("c"), "1", "ltp")
        await rds.config_set("maxmemory-policy", "noeviction")
        await rds.config_set("maxmemory", "1")
        try:
            with pytest.raises(redis.ResponseError, match="maxmemory"):
                await _batch(rds, StubFence()).execute()
        finally:
            await rds.config_set("maxmemory", "0")
        assert await rds.hgetall(KEYS.claims("c")) == {b"1": b"ltp"}
    finally:
        await rds.aclose()


async def test_without_a_lease_the_writes_are_one_transaction(redis_url: str) -> None:
    rds = redis.from_url(redis_url)
    try:
        await rds.set(KEYS.leader, "6:there:2")  # not asked: no lease, nothing to check
        await _batch(rds, None).execute()  # type: ignore[arg-type]
        assert await _written(rds) == (5000, True, 1)
    finally:
        await rds.aclose()


def test_every_slot_has_a_tag() -> None:
    from redis.crc import key_slot

    for slot in (0, 1, 8000, bus.SLOTS - 1):
        assert key_slot(KEYS.slot_fence(bus.slot_tag(slot)).encode()) == slot





EQUITY = 408065


class FrozenLease(Lease):
    """Once ``frozen``, trusts itself and asks Redis nothing more: a leader frozen between
    its own check of the lease and its write (or whose clock stopped while its host slept).
    It learns of a loss only from a write Redis refused."""

    made: list[FrozenLease] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frozen = False
        FrozenLease.made.append(self)

    def valid(self) -> bool:
        return not self.lost.is_set() if self.frozen else super().valid()

    async def renew(self) -> bool:
        return True if self.frozen else await super().renew()


class NotedPublisher(Publisher):
    made: list[NotedPublisher] = []

    def __init__(self, settings, tuning: Tuning | None = None, encoder=None, lease=None) -> None:
        # status written at start only: the control loop's writes are the ones to refuse
        super().__init__(settings, replace(tuning or Tuning(), status_interval=3600), encoder, lease)
        NotedPublisher.made.append(self)


async def test_a_leader_frozen_past_a_takeover_has_its_writes_refused_and_steps_down(
    settings, simulator, rds, control, keys, monkeypatch
) -> None:
    monkeypatch.setattr(FrozenLease, "made", [])
    monkeypatch.setattr(NotedPublisher, "made", [])
    monkeypatch.setattr(app, "Lease", FrozenLease)
    monkeypatch.setattr(app, "Publisher", NotedPublisher)
    stop = asyncio.Event()
    running = asyncio.create_task(app.run(settings, stop))
    try:
        await eventually(lambda: NotedPublisher.made and NotedPublisher.made[0].control._task, timeout=15)
        leader, lease = NotedPublisher.made[0], FrozenLease.made[0]
        assert (await control.subscribe([EQUITY], mode="ltp", client="a", timeout=10)).ok
        lease.frozen = True
        fence = await rds.incr("kite:leader_fence")  # another publisher takes the lease
        await rds.set(keys.leader, f"{fence}:elsewhere:1")
        await rds.delete(keys.status)
        entry = {"op": "subscribe", "tokens": "256265", "client": "b"}
        request = (await rds.xadd(keys.control, entry)).decode()  # type: ignore[arg-type]

        # the request is read, and its batch refused (or, without the fence, written)
        await eventually(lambda: lease.lost.is_set() or rds.exists(keys.claims("b")), timeout=10)
        pending = await rds.xpending_range(keys.control, CONTROL_GROUP, "-", "+", 10)
        assert [p["message_id"].decode() for p in pending] == [request]  # read, never acknowledged
        assert await rds.exists(keys.claims("b")) == 0  # no claim
        assert await rds.hget(keys.token_conn, "256265") is None
        assert await rds.sismember(keys.clients, "b") == 0
        results = await rds.xrange(keys.control_results)
        assert request.encode() not in [fields[b"request"] for _, fields in results]  # no result
        assert lease.lost.is_set()  # told by Redis, not by its clock
        # it steps down: its Kite sockets closed, nothing written on the way, standing by
        await eventually(lambda: not simulator.sessions, timeout=10)
        await eventually(lambda: rds.hget(keys.standby, "pid"), timeout=10)
        assert leader.control._deposed and not running.done()
        assert await rds.exists(keys.status) == 0
        assert await rds.hget(keys.token_conn, str(EQUITY)) == b"0"  # the clean stop's DEL was not sent
    finally:
        stop.set()
        await asyncio.wait_for(running, 15)
