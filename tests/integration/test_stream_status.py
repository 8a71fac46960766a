"""What consumers are told: stream status, gaps, slow-consumer recovery, conflated delivery.

The real stack: the simulator over a socket with its faults, a real redis-server, the
publisher, and TickSubscriber as strategies use it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
import time

import hiredis
import msgpack
import pytest
import redis.asyncio as redis

from config import Keys
from consumers.control import ControlClient
from consumers.subscriber import StreamStatus, TickSubscriber
from kitebus.localredis import LocalRedis, free_port
from publisher.app import Publisher
from rediswire import resp
from tests.integration.conftest import FAST, eventually

KEYS = Keys("kite")


def _tokens(n: int) -> list[int]:
    return [(i << 8) | 1 for i in range(1, n + 1)]


def _by_session(simulator) -> dict[int, set[int]]:
    return {s.id: set(s.modes) for s in simulator.sessions}


async def _subscribed(simulator, control, tokens: list[int], mode: str = "quote") -> dict[int, set[int]]:
    await control.subscribe(tokens, mode=mode, client="strategy")
    await eventually(lambda: sum(len(s.modes) for s in simulator.sessions) == len(tokens))
    return _by_session(simulator)


@pytest.mark.parametrize(
    ("fault", "bound"),
    [("drop", 0.5), ("stall", FAST.stall_timeout + 1.0)],  # a stall is seen by the watchdog
)
async def test_a_failed_connection_makes_exactly_its_tokens_stale_then_live(
    simulator, publisher, redis_url, control, rds, fault: str, bound: float
) -> None:
    tokens = _tokens(6)
    sessions = await _subscribed(simulator, control, tokens)
    events: list[tuple[float, StreamStatus]] = []
    async with _watcher(redis_url, events) as sub:
        await sub.listen(tokens)
        await eventually(lambda: _all_status(sub, tokens, "live"))
        events.clear()
        victim, victim_tokens = next(iter(sessions.items()))
        failed_at = time.monotonic()
        if fault == "drop":
            simulator.drop(victim)
        else:
            simulator.stall(30, victim)

        await eventually(lambda: _all_status(sub, victim_tokens, "stale"), timeout=10)
        stale = [(at, e) for at, e in events if e.status == "stale"]
        assert set(stale[0][1].tokens) == victim_tokens  # exactly that connection's tokens
        assert stale[0][0] - failed_at < bound
        await eventually(lambda: _all_status(sub, tokens, "live"), timeout=10)  # reconnected
        assert all(set(e.tokens) <= victim_tokens for _, e in events)  # the others saw nothing
        stored = await rds.hgetall(KEYS.token_status)
        assert {int(k): v for k, v in stored.items()} == dict.fromkeys(tokens, b"live")


def _watcher(redis_url: str, events: list) -> TickSubscriber:
    def record(event: StreamStatus) -> None:
        events.append((time.monotonic(), event))

    return TickSubscriber(redis_url, client="watcher", on_status=record)


async def _all_status(sub: TickSubscriber, tokens, wanted: str) -> bool:
    """Read what has arrived (status comes with the stream), then check."""
    await sub.batch(limit=10**6, wait=0.05)
    return all(sub.status.get(t) == wanted for t in tokens)


def _count_everything(port: int, stop: threading.Event, counts: dict) -> None:
    """A fast consumer of every tick channel (hiredis in a thread), to show it is unaffected."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(resp.command("PSUBSCRIBE", KEYS.ticks_pattern))
    sock.settimeout(0.2)
    reader = hiredis.Reader()
    while not stop.is_set():
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            counts["cut"] = True
            break
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if reply[0] == b"pmessage":
                counts["ticks"] = counts.get("ticks", 0) + 1
    sock.close()


async def test_a_slow_consumer_is_cut_recovers_and_reports_its_gap(
    simulator, settings, tmp_path, caplog
) -> None:
    server = LocalRedis(tmp_path, port=free_port())
    server.start()
    rds = redis.from_url(server.url)
    await rds.config_set("client-output-buffer-limit", "pubsub 256kb 0 0")  # cut a slow reader early
    publisher = Publisher(settings.model_copy(update={"redis_url": server.url}), FAST)
    await publisher.start()
    stop, counts = threading.Event(), {}
    fast = threading.Thread(target=_count_everything, args=(server.port, stop, counts))
    try:
        tokens = _tokens(300)
        await ControlClient(rds).subscribe(tokens, mode="full", client="strategy")
        await eventually(lambda: sum(len(s.modes) for s in simulator.sessions) == len(tokens))
        fast.start()
        async with TickSubscriber(server.url, client="slow", max_unread=100) as slow:
            await slow.listen(tokens)
            await slow.batch(limit=10**6, wait=0.1)
            published_before = publisher.sink.published
            sent = await simulator.flood(3000)  # ~6 MB of ticks while `slow` reads nothing
            await eventually(lambda: publisher.sink.published - published_before >= sent, timeout=30)

            with caplog.at_level(logging.WARNING, logger="kitebus.subscriber"):
                async def recovered() -> bool:
                    await slow.batch(limit=10**6, wait=0.1)
                    return slow.reconnects >= 1

                await eventually(recovered, timeout=20)
            assert slow.missed > 0 and sum(slow.gaps.values()) == slow.missed
            assert "cut off by Redis" in caplog.text
            live = await slow.batch(wait=2.0)  # and it goes on receiving
            assert live
        await eventually(lambda: counts.get("ticks", 0) >= sent, timeout=20)
        assert not counts.get("cut")  # the fast consumer was not touched
        assert (publisher.sink.dropped, publisher.sink.conflated) == (0, 0)
    finally:
        stop.set()
        if fast.is_alive():
            fast.join(5)
        await publisher.stop()
        await rds.aclose()
        server.stop()


async def test_conflated_delivery_gives_each_token_its_newest_at_most_every_interval(
    simulator, publisher, redis_url, control
) -> None:
    tokens = _tokens(30)
    await _subscribed(simulator, control, tokens, mode="ltp")
    delivered: dict[int, list[tuple[int, dict]]] = {}
    async with TickSubscriber(redis_url, client="screen", conflate_ms=200, snapshot=False) as screen:
        await screen.listen(tokens)
        flood = asyncio.create_task(simulator.flood(3000))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or not flood.done():
            for tick in await screen.batch(wait=0.1):
                delivered.setdefault(tick["instrument_token"], []).append((time.monotonic_ns(), tick))
        await flood
        newest = {t: msgpack.unpackb(publisher.sink.cache[t])["seq"] for t in tokens}

        async def caught_up() -> bool:
            for tick in await screen.batch(wait=0.3):
                delivered.setdefault(tick["instrument_token"], []).append((time.monotonic_ns(), tick))
            return all(delivered.get(t) and delivered[t][-1][1]["seq"] >= newest[t] for t in tokens)

        await eventually(caught_up, timeout=10)
    assert screen.conflated > 0 and screen.missed == 0
    for ticks in delivered.values():
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(ticks)]
        assert min(gaps, default=10**9) >= 190_000_000  # never more often than every 200 ms
