"""The tick flow under load and while Redis misbehaves: backpressure, conflation, the last-value cache.

Real parts only: the simulator over a socket, a real redis-server (a private one where the
test stops or restarts it), the publisher in this process so its counters can be read.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis

from config import Keys, Settings
from consumers.control import ControlClient
from consumers.status import read_status
from kitebus.localredis import LocalRedis, free_port
from publisher.app import Publisher, Tuning
from simulator.server import TickerServer
from tests.integration.conftest import FAST, eventually

KEYS = Keys("kite")


def _tokens(n: int) -> list[int]:
    return [(i << 8) | 1 for i in range(1, n + 1)]  # generic NSE instruments


@asynccontextmanager
async def _private_redis(tmp_path) -> AsyncIterator[LocalRedis]:
    server = LocalRedis(tmp_path, port=free_port())
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.returncode is None:
            os.kill(server.process.pid, signal.SIGCONT)  # never leave it stopped
        server.stop()


@asynccontextmanager
async def _publisher(settings: Settings, tuning: Tuning) -> AsyncIterator[Publisher]:
    publisher = Publisher(settings, tuning)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


MARK = KEYS.ticks(0)  # no instrument's channel: the test's own markers in the flow


@asynccontextmanager
async def _channel_reader(url: str) -> AsyncIterator[dict]:
    """The newest payload seen on each ``kite:ticks:*`` channel, a count of them all, and
    that count at each marker published on ``MARK``."""
    client = redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(KEYS.ticks_pattern)
    seen: dict = {"count": 0, "last": {}, "marks": []}

    async def read() -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message and message["type"] == "pmessage" and message["channel"] == MARK.encode():
                seen["marks"].append(seen["count"])
            elif message and message["type"] == "pmessage":
                seen["count"] += 1
                seen["last"][int(message["channel"].rsplit(b":", 1)[1])] = message["data"]

    task = asyncio.create_task(read())
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


async def _mark(rds: redis.Redis, seen: dict) -> int:
    """The reader's count of ticks when it hears a marker published now: every tick Redis
    took before it, none it took after."""
    marks = len(seen["marks"])
    await rds.publish(MARK, b"mark")
    await eventually(lambda: len(seen["marks"]) > marks)
    return seen["marks"][marks]


async def test_a_burst_far_larger_than_the_backlog_bound_loses_nothing(simulator, settings, rds) -> None:
    tuning = Tuning(**{**FAST.__dict__, "max_backlog": 64 << 10})  # one full frame is ~10 times this
    tokens = _tokens(300)
    async with _publisher(settings, tuning) as publisher, _channel_reader(settings.redis_url) as seen:
        sink = publisher.sink
        await ControlClient(rds).subscribe(tokens, mode="full", client="burst")
        await eventually(lambda: sum(len(s.modes) for s in simulator.sessions) == len(tokens))
        await eventually(lambda: len(sink.cache) == len(tokens))  # the market's own ticks came
        simulator.paused = True  # from here the flood's ticks only
        # every tick the market sent is out (or skipped, sent before its claim)
        await eventually(lambda: sink.acknowledged + sink.unclaimed == simulator.sent)
        start, before = sink.acknowledged, await _mark(rds, seen)
        sent = await simulator.flood(10_000)
        assert sent == 30_000
        await eventually(lambda: sink.acknowledged - start == sent, timeout=30)
        assert await _mark(rds, seen) - before == sent  # exactly the flood's, each heard once
        assert sink.pauses > 0  # the connections did wait for Redis
        assert (sink.dropped, sink.conflated) == (0, 0)
        assert all(c.reconnects == 0 for c in publisher.connections)


async def test_redis_stopped_mid_stream_conflates_and_every_token_gets_its_newest_tick(
    simulator, settings, tmp_path
) -> None:
    tuning = Tuning(**{**FAST.__dict__, "stall_timeout": 5.0, "max_backlog": 32 << 10, "conflate_after": 0.3})
    tokens = _tokens(200)
    async with _private_redis(tmp_path) as server:
        settings = settings.model_copy(update={"redis_url": server.url})
        rds = redis.from_url(server.url)
        try:
            async with _publisher(settings, tuning) as publisher, _channel_reader(server.url) as seen:
                sink = publisher.sink
                await ControlClient(rds).subscribe(tokens, mode="full", client="c")
                await eventually(lambda: len(sink.cache) == len(tokens))

                os.kill(server.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                await eventually(lambda: sink.conflating)
                simulator.stall(4.0)  # no new ticks from here: the cache holds each token's newest
                # frames already on the wire arrive
                await eventually(lambda: sink.queued + sink.unclaimed == simulator.sent)
                os.kill(server.process.pid, signal.SIGCONT)  # type: ignore[union-attr]

                await eventually(lambda: not sink.conflating and sink.conflated > 0)
                newest = dict(sink.cache)
                assert set(newest) == set(tokens)
                await eventually(lambda: seen["last"] == newest)  # every channel ends on the newest

                async def snapshot_is_newest() -> bool:
                    stored = await rds.hgetall(KEYS.last)
                    return {int(k): v for k, v in stored.items()} == newest

                await eventually(snapshot_is_newest)
                assert sink.dropped == 0
                await eventually(lambda: rds.hget(KEYS.status, "conflated"))
        finally:
            await rds.aclose()


async def test_redis_restarted_empty_gets_every_snapshot_back_without_a_new_tick(settings, tmp_path) -> None:
    tokens = _tokens(50)
    async with (
        TickerServer(rate=0.01, max_rate=1, heartbeat_interval=0.2) as quiet,  # no tick for 100 s
        _private_redis(tmp_path) as server,
    ):
        settings = settings.model_copy(update={"redis_url": server.url, "kite_ws_url": quiet.url})
        rds = redis.from_url(server.url)
        try:
            async with _publisher(settings, FAST) as publisher:
                await ControlClient(rds).subscribe(tokens, mode="quote", client="c")
                await eventually(lambda: sum(len(s.modes) for s in quiet.sessions) == len(tokens))
                await quiet.flood(len(tokens) // 3 + 1)
                await eventually(lambda: len(publisher.sink.cache) == len(tokens))
                await eventually(lambda: rds.hlen(KEYS.last))
                ticks_before = sum(c.ticks for c in publisher.connections)

                server.stop()
                server.start()  # empty: no persistence
                await rds.aclose()
                rds = redis.from_url(server.url)

                async def snapshot_complete() -> bool:
                    return await rds.hlen(KEYS.last) == len(tokens)

                await eventually(snapshot_complete)
                stored = {int(k): v for k, v in (await rds.hgetall(KEYS.last)).items()}
                assert stored == publisher.sink.cache
                assert sum(c.ticks for c in publisher.connections) == ticks_before  # no tick came
        finally:
            await rds.aclose()


async def test_released_tokens_leave_the_cache_and_the_snapshot(simulator, settings, rds, control) -> None:
    kept, released = 408065, 884737
    async with _publisher(settings, FAST) as publisher:
        await control.subscribe([kept, released], mode="ltp", client="c")
        await eventually(lambda: {kept, released} <= set(publisher.sink.cache))
        await control.unsubscribe([released], client="c")
        await eventually(lambda: released not in publisher.sink.cache)

        async def snapshot_only_kept() -> bool:
            return set(await rds.hkeys(KEYS.last)) == {str(kept).encode()}

        await eventually(snapshot_only_kept)


async def test_ticks_of_tokens_no_one_claims_are_counted_and_not_published(
    simulator, settings, rds, control
) -> None:
    claimed, unclaimed = 408065, 884737
    async with _publisher(settings, FAST) as publisher:
        await control.subscribe([claimed], mode="ltp", client="c")
        await eventually(lambda: claimed in publisher.sink.cache)
        pubsub = rds.pubsub()
        await pubsub.psubscribe(KEYS.ticks("*"))
        try:
            stray = {"instrument_token": unclaimed, "mode": "ltp", "last_price": 12.5}
            sent = await simulator.send_unsubscribed([stray, stray])  # on every connection
            assert sent >= 2
            await eventually(lambda: publisher.sink.unclaimed >= sent)
            # A claimed tick sent after the strays, on the connection holding it: once it is
            # on the bus, the strays would be too had they been published.
            marker = {"instrument_token": claimed, "mode": "ltp", "last_price": 99.5}
            await simulator.send_ticks([marker])
            channels: list[bytes] = []

            async def marker_arrived() -> bool:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message is not None:
                    channels.append(message["channel"])
                return KEYS.ticks(claimed).encode() in channels and publisher.sink.unclaimed == sent

            await eventually(marker_arrived)
            assert KEYS.ticks(unclaimed).encode() not in channels
            assert unclaimed not in publisher.sink.cache and await rds.hget(KEYS.last, str(unclaimed)) is None

            async def status_counts() -> bool:
                return await rds.hget(KEYS.status, "unclaimed") == str(sent).encode()

            await eventually(status_counts)
            assert (await read_status(rds, KEYS, sample=0))["publisher"]["unclaimed"] == sent
        finally:
            await pubsub.aclose()
