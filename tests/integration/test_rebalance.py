"""op rebalance against the simulator: make-before-break, one publisher per tick, no gap."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import msgpack
import pytest
import redis.asyncio as redis

from config import load_settings
from consumers.control import SubscriptionRejected
from publisher.app import Publisher
from simulator.server import TickerServer
from tests.integration.conftest import FAST, eventually

A, B, C, D, E, F = 408065, 2953217, 341249, 1270529, 779521, 1510401
TAG = 10**9  # volumes from here on are this test's own ticks


@pytest.fixture
async def quiet_simulator() -> AsyncIterator[TickerServer]:
    """Sends no tick of its own: every tick on the wire is one the test sent."""
    async with TickerServer(rate=0.01, heartbeat_interval=0.2, snapshots=False) as server:
        yield server


@pytest.fixture
async def small(quiet_simulator, redis_url) -> AsyncIterator[Publisher]:
    """Three connections of two tokens each, holding A and D on 0 and F on 2."""
    settings = load_settings(
        kite_ws_url=quiet_simulator.url, redis_url=redis_url, kite_api_key="kitebus",
        kite_access_token="simulator", namespace="kite", connections=3, tokens_per_connection=2,
    )  # fmt: skip
    running = Publisher(settings, dataclasses.replace(FAST, live_timeout=1.0))
    await running.start()
    await eventually(lambda: all(c.state == "live" for c in running.connections))
    yield running
    await running.stop()


def _tick(token: int, volume: int) -> dict:
    return {
        "instrument_token": token, "last_price": 100.0 + volume % 100, "last_traded_quantity": 1,
        "average_traded_price": 100.0, "volume_traded": volume, "total_buy_quantity": 0,
        "total_sell_quantity": 0, "ohlc": {"open": 99.0, "high": 101.0, "low": 98.0, "close": 99.5},
    }  # fmt: skip


class Watch:
    """Samples the simulator at every turn of the loop: a held token always on some
    connection at Kite; no connection ever over its limit (the simulator's own peak)."""

    def __init__(self, simulator: TickerServer, held: set[int]) -> None:
        self.simulator, self.held = simulator, held
        self.gaps: list[int] = []
        self.samples = 0

    async def run(self) -> None:
        while True:
            at_kite = {t for s in self.simulator.sessions for t in s.modes}
            self.gaps.extend(self.held - at_kite)
            self.samples += 1
            await asyncio.sleep(0)


async def _setup(small: Publisher, control, simulator: TickerServer) -> None:
    await control.subscribe([A, B, C, D, E, F], client="s")  # 0: A D, 1: B E, 2: C F
    await control.unsubscribe([B, E, C], client="s")
    assert small.book.loads == [2, 0, 1]
    await eventually(lambda: sorted(len(s.modes) for s in simulator.sessions) == [0, 1, 2])


async def test_rebalance_moves_make_before_break_with_every_tick_published_once(
    small, quiet_simulator, control, rds, keys, redis_url
) -> None:
    simulator = quiet_simulator
    await _setup(small, control, simulator)
    held = {A, D, F}
    listener = redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(*(keys.ticks(t) for t in held))
    received: dict[int, list[dict]] = {t: [] for t in held}

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                tick = msgpack.unpackb(message["data"])
                received[tick["instrument_token"]].append(tick)

    sent = 0

    async def feed() -> None:  # the same tick to every connection holding it, as Kite does
        nonlocal sent
        while True:
            sent += 1
            await simulator.send_ticks([_tick(t, TAG + sent) for t in sorted(held)])
            await asyncio.sleep(0.003)

    watch = Watch(simulator, held)
    tasks = [asyncio.create_task(job()) for job in (listen, feed, watch.run)]
    try:
        await eventually(lambda: all(received.values()))
        result = await control.rebalance(client="ops")
        (moved,) = result.applied
        assert moved in (A, D) and result.loads == (1, 1, 1) and result.op == "rebalanced"
        last = sent + 5
        await eventually(lambda: sent >= last)
    finally:
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
    await eventually(lambda: all(ticks[-1]["volume_traded"] == TAG + sent for ticks in received.values()))
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    await pubsub.aclose()
    await listener.aclose()

    assert watch.samples > 100 and watch.gaps == []
    assert max(s.peak for s in simulator.sessions) == 2
    for token, ticks in received.items():
        volumes = [t["volume_traded"] - TAG for t in ticks if t["volume_traded"] >= TAG]
        assert volumes == sorted(set(volumes)), f"{token}: a tick published twice or out of order"
        seqs = [t["seq"] for t in ticks]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        if token != moved:
            assert volumes == list(range(volumes[0], sent + 1))  # untouched tokens lose nothing
    # the break: only the new connection holds it, at Kite and in Redis
    holders = [s for s in simulator.sessions if moved in s.modes]
    assert len(holders) == 1 and any(moved in s.unsubscribed for s in simulator.sessions)
    assert small.book.placement[moved] == 1 and small.book.moving == {}
    assert await rds.hget(keys.token_conn, str(moved)) == b"1"
    assert small.book.loads == [1, 1, 1] and not small.moves


async def test_a_second_rebalance_while_tokens_move_is_refused_and_changes_nothing(
    small, quiet_simulator, control, rds, keys
) -> None:
    await _setup(small, control, quiet_simulator)
    # no tick at all: the move waits for its timeout, so it is still in progress
    first = await control.request("rebalance", None, client="ops")
    assert first.ok and len(first.applied) == 1
    before = (dict(small.book.placement), list(small.book.loads), await rds.hgetall(keys.token_conn))
    with pytest.raises(SubscriptionRejected, match="still moving"):
        await control.rebalance(client="ops")
    assert (small.book.placement, small.book.loads, await rds.hgetall(keys.token_conn)) == before
    done = await control.follow_up(first, "rebalanced", timeout=15)
    assert done.applied == first.applied and done.loads == (1, 1, 1)


async def test_an_even_publisher_rebalances_to_nothing(small, quiet_simulator, control) -> None:
    await control.subscribe([A, B, C], client="s")
    result = await control.rebalance()
    assert result.ok and result.applied == () and result.loads == (1, 1, 1)


async def test_a_token_released_mid_move_leaves_kite_entirely(small, quiet_simulator, control, keys, rds):
    await _setup(small, control, quiet_simulator)
    first = await control.request("rebalance", None, client="ops")
    (moving,) = first.applied
    await control.unsubscribe([moving], client="s")
    await eventually(lambda: all(moving not in s.modes for s in quiet_simulator.sessions))
    done = await control.follow_up(first, "rebalanced", timeout=15)
    assert done.applied == () and small.book.moving == {} and not small.moves
    assert await rds.hget(keys.token_conn, str(moving)) is None
