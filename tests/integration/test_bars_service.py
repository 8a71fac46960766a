"""``kitebus bars`` on a real redis-server: ticks published on the bus, bars read back
from their channel (BarReader, live and as a late joiner) and from the kept list."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import msgpack
import redis.asyncio as redis

from config import Keys, load_settings
from consumers.bars import BarReader, bar_start, bars_key
from kitebus.bars_service import BarsOptions, BarsService
from kitebus.localredis import LocalRedis, free_port
from tests.integration.conftest import eventually

KEYS = Keys("kite")
TOKEN = (4242 << 8) | 1  # an NSE instrument
LATER = (4343 << 8) | 7  # an MCX one, carried once the service runs


class Feed:
    """Ticks published as the publisher does: msgpack on ``{ns}:ticks:{token}``, with seq."""

    def __init__(self, rds: redis.Redis) -> None:
        self.rds = rds
        self.seq: dict[int, int] = {}

    async def tick(self, token: int, at: float, price: float, volume: int) -> None:
        self.seq[token] = self.seq.get(token, 0) + 1
        payload = {
            "instrument_token": token, "mode": "full", "tradable": True, "last_price": price,
            "volume_traded": volume, "exchange_timestamp": int(at), "received_at_ns": time.time_ns(),
            "seq": self.seq[token], "epoch": 1,
        }  # fmt: skip
        await self.rds.publish(KEYS.ticks(token), msgpack.packb(payload))


async def _listened(rds: redis.Redis, token: int) -> bool:
    return bool((await rds.pubsub_numsub(KEYS.ticks(token)))[0][1])


def _bar(token: int, start: float, o: float, h: float, lo: float, c: float, volume: int, ticks: int) -> dict:
    return {
        "token": token, "interval": "1m", "start": int(start), "end": int(start) + 60, "open": o,
        "high": h, "low": lo, "close": c, "volume": volume, "ticks": ticks,
    }  # fmt: skip


async def _take(reader: BarReader, n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < n:
        got += await reader.batch(wait=0.5)
    return got


async def test_bars_from_published_ticks_reach_the_channel_and_the_kept_list(redis_url: str) -> None:
    rds = redis.from_url(redis_url)
    await rds.hset(KEYS.token_conn, str(TOKEN), "0")
    settings = load_settings(redis_url=redis_url, namespace="kite")
    # bars of minutes ten minutes ahead: the service's clock (flush) never closes them, ticks do
    m = (int(time.time()) // 60 + 10) * 60
    service = BarsService(settings, BarsOptions(intervals=["1m"], keep=2, grace=2.0, follow=0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    feed = Feed(rds)
    try:
        await eventually(lambda: _listened(rds, TOKEN))  # it followed {ns}:token_conn
        async with BarReader(redis_url, [TOKEN, LATER], ["1m"]) as live:
            await feed.tick(TOKEN, m + 1, 100.0, 1000)  # first tick: the volume base
            await feed.tick(TOKEN, m + 20, 104.0, 1100)
            await feed.tick(TOKEN, m + 59, 99.0, 1150)
            await feed.tick(TOKEN, m + 61, 101.0, 1200)
            await feed.tick(TOKEN, m + 62, 102.0, 1260)  # past m + 60 + grace: bar m closes
            await feed.tick(TOKEN, m + 125, 103.0, 1300)
            await feed.tick(TOKEN, m + 190, 104.0, 1400)
            expected = [
                _bar(TOKEN, m, 100.0, 104.0, 99.0, 99.0, 150, 3),
                _bar(TOKEN, m + 60, 101.0, 102.0, 101.0, 102.0, 110, 2),
                _bar(TOKEN, m + 120, 103.0, 103.0, 103.0, 103.0, 40, 1),
            ]
            assert await asyncio.wait_for(_take(live, 3), 10) == expected

            kept = [msgpack.unpackb(raw) for raw in await rds.lrange(bars_key("kite", "1m", TOKEN), 0, -1)]
            assert kept == expected[1:]  # the newest keep=2, oldest first

            async with BarReader(redis_url, [TOKEN], ["1m"]) as late:
                assert await late.batch(wait=0.1) == expected[1:]  # a late joiner: the history first
                await feed.tick(TOKEN, m + 250, 105.0, 1450)  # closes bar m + 180
                assert await asyncio.wait_for(_take(late, 1), 10) == [
                    _bar(TOKEN, m + 180, 104.0, 104.0, 104.0, 104.0, 100, 1)
                ]

            await rds.hset(KEYS.token_conn, str(LATER), "1")  # a new subscription at the publisher
            await eventually(lambda: _listened(rds, LATER))
            await feed.tick(LATER, m + 5, 7000.0, 10)
            await feed.tick(LATER, m + 70, 7001.0, 15)
            got = await asyncio.wait_for(_take(live, 2), 10)
            assert got[-1] == _bar(LATER, m, 7000.0, 7000.0, 7000.0, 7000.0, 0, 1)
        assert service.builder.late == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await rds.aclose()


async def test_the_command_ends_cleanly_on_sigterm(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"}
    rds = redis.from_url(redis_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "bars", str(TOKEN), "--interval", "1m", "--interval", "5m", env=env
    )
    try:
        await eventually(lambda: _listened(rds, TOKEN), timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rds.aclose()


async def test_bars_build_from_the_real_publishers_ticks(publisher: Any, control: Any, settings: Any) -> None:
    """Simulator -> publisher -> bus -> the service: the payload's fields make bars (full
    mode: exchange time and volume; ltp: receive time)."""
    full_token, ltp_token = (408065, 884737)
    await control.subscribe([full_token], mode="full", client="bars-test")
    await control.subscribe([ltp_token], mode="ltp", client="bars-test")
    service = BarsService(settings, BarsOptions(intervals=["1m", "day"], follow=0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))

    def open_bars() -> dict[tuple[int, str], dict[str, Any]]:
        bars = {(b["token"], b["interval"]): b for b in service.builder.pending()}
        ready = all(bars.get((t, "1m"), {}).get("ticks", 0) >= 3 for t in (full_token, ltp_token))
        return bars if ready else {}

    try:
        bars = await eventually(open_bars, timeout=20)
        now = time.time()
        for token in (full_token, ltp_token):
            minute = bars[(token, "1m")]
            assert minute["start"] % 60 == 0 and now - 125 < minute["start"] <= now
            assert minute["low"] <= minute["close"] <= minute["high"] and minute["volume"] >= 0
            assert bars[(token, "day")]["start"] == bar_start(token, "day", now)
        assert bars[(ltp_token, "1m")]["volume"] == 0  # ltp carries no volume_traded
        assert service.builder.late == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_redis_restart_keeps_the_open_bars(tmp_path: Any) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    server = LocalRedis(tmp_path / "first", port=free_port())
    server.start()
    m = (int(time.time()) // 60 + 10) * 60
    service = BarsService(
        load_settings(redis_url=server.url, namespace="kite"), BarsOptions(tokens=[TOKEN], grace=2.0)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        rds = redis.from_url(server.url)
        await eventually(lambda: _listened(rds, TOKEN))
        feed = Feed(rds)
        await feed.tick(TOKEN, m + 1, 100.0, 1000)
        await feed.tick(TOKEN, m + 20, 104.0, 1100)
        await eventually(lambda: service.builder.pending())
        await rds.aclose()
        server.stop()
        await eventually(lambda: service.outages)
        server = LocalRedis(tmp_path / "second", port=server.port)
        server.start()
        rds = redis.from_url(server.url)
        await eventually(lambda: _listened(rds, TOKEN), timeout=20)
        feed.rds = rds
        await feed.tick(TOKEN, m + 30, 98.0, 1150)
        await feed.tick(TOKEN, m + 63, 101.0, 1200)  # closes bar m: ticks from both sides of the restart
        name = bars_key("kite", "1m", TOKEN)
        kept = await eventually(lambda: rds.lrange(name, 0, -1))
        assert [msgpack.unpackb(raw) for raw in kept] == [_bar(TOKEN, m, 100.0, 104.0, 98.0, 98.0, 150, 3)]
        await rds.aclose()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        server.stop()


async def test_a_past_days_ticks_fill_their_bars_and_a_quiet_one_closes_by_the_clock(
    redis_url: str,
) -> None:
    """A replay's ticks carry their recorded times: the flush follows the ticks' clock,
    not this machine's, else every bar would close at its first tick."""
    rds = redis.from_url(redis_url)
    m = (int(time.time()) // 60 - 1440) * 60  # yesterday
    service = BarsService(load_settings(redis_url=redis_url, namespace="kite"), BarsOptions(tokens=[TOKEN]))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: _listened(rds, TOKEN))
        async with BarReader(redis_url, [TOKEN], ["1m"], history=False) as live:
            feed = Feed(rds)
            await feed.tick(TOKEN, m + 1, 100.0, 1000)
            await feed.tick(TOKEN, m + 30, 104.0, 1100)
            await feed.tick(TOKEN, m + 59, 99.0, 1150)  # then quiet: about 3 s later the flush closes it
            got = await asyncio.wait_for(_take(live, 1), 15)
        assert got == [_bar(TOKEN, m, 100.0, 104.0, 99.0, 99.0, 150, 3)]
        assert service.builder.late == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await rds.aclose()


async def test_the_command_refuses_an_unknown_symbol_and_a_bad_keep(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"}
    for args in (["NSE:NOPE"], ["--keep", "0", str(TOKEN)]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kitebus", "bars", *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2
        assert (b"NSE:NOPE" if args == ["NSE:NOPE"] else b"keep") in err
