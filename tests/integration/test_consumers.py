"""The strategy library against the real stack: redis-server + simulator + publisher."""

from __future__ import annotations

import asyncio
import logging
import queue

import msgpack
import pytest

from consumers.control import SubscriptionRejected
from consumers.instruments import UnknownInstrument
from consumers.subscriber import BlockingTickSubscriber, TickSubscriber
from tests.integration.conftest import eventually

INFY, NIFTY = 408065, 256265


async def _first(sub: TickSubscriber, count: int) -> list[dict]:
    ticks = []
    async with asyncio.timeout(10):
        async for tick in sub:
            ticks.append(tick)
            if len(ticks) == count:
                return ticks
    return ticks


async def test_subscribe_receive_and_release_on_exit(publisher, redis_url, rds, keys) -> None:
    async with TickSubscriber(redis_url, client="strat-1") as sub:
        result = await sub.subscribe([INFY, NIFTY], mode="full")
        assert result.ok and set(result.applied) == {INFY, NIFTY}
        assert await rds.hgetall(keys.claims("strat-1")) == {b"408065": b"full", b"256265": b"full"}
        ticks = await _first(sub, 6)
        assert {t["instrument_token"] for t in ticks} == {INFY, NIFTY}
        infy = next(t for t in ticks if t["instrument_token"] == INFY)
        assert infy["mode"] == "full" and len(infy["depth"]["sell"]) == 5 and "last_price" in infy
    assert await rds.hgetall(keys.claims("strat-1")) == {}
    assert await rds.hget(keys.token_conn, str(INFY)) is None  # nobody else held it


async def test_late_joiner_gets_the_snapshot_first(publisher, redis_url, control, rds, keys) -> None:
    await control.subscribe([INFY], mode="quote", client="early")
    await eventually(lambda: rds.hexists(keys.last, str(INFY)))
    async with TickSubscriber(redis_url, client="late") as sub:
        await sub.subscribe([INFY], mode="quote")
        snapshot_seq = sub._last[INFY][1]  # (epoch, seq) of the snapshot it took
        first, second = await _first(sub, 2)
        assert first["seq"] == snapshot_seq  # the snapshot, immediately
        assert second["seq"] > snapshot_seq  # then live ticks, never the same one twice
        assert second["epoch"] == first["epoch"]
    assert await rds.hget(keys.token_mode, str(INFY)) == b"quote"  # 'early' still holds it


async def test_rejection_raises_naming_the_tokens(settings, redis_url) -> None:
    from publisher.app import Publisher
    from tests.integration.conftest import FAST

    small = Publisher(settings.model_copy(update={"connections": 1, "tokens_per_connection": 2}), FAST)
    await small.start()
    try:
        async with TickSubscriber(redis_url, client="greedy") as sub:
            with pytest.raises(SubscriptionRejected) as caught:
                await sub.subscribe([1 << 8 | 1, 2 << 8 | 1, 3 << 8 | 1])
            assert caught.value.rejected == (3 << 8 | 1,)
            assert "rejected: 769" in str(caught.value)
            assert sub.claimed == {1 << 8 | 1, 2 << 8 | 1}  # the applied part is released on exit
        assert small.book.claims == {}
    finally:
        await small.stop()


async def test_symbols_resolve_through_redis_with_no_file_here(publisher, redis_url, rds, keys) -> None:
    async with TickSubscriber(redis_url, client="sym") as sub:  # no instruments file on this side
        result = await sub.subscribe(["nse:infy", "NSE:NIFTY 50", NIFTY], mode="ltp")
        assert set(result.applied) == {INFY, NIFTY} and sub.listened == {INFY, NIFTY}
        assert await sub.symbols([INFY, NIFTY, 1]) == {INFY: "NSE:INFY", NIFTY: "NSE:NIFTY 50"}
        with pytest.raises(UnknownInstrument, match="unknown instruments NSE:NOPE, BSE:NADA"):
            await sub.subscribe(["NSE:NOPE", "NSE:INFY", "BSE:NADA"])
        with pytest.raises(ValueError, match="bad token"):
            await sub.subscribe(["INFY"])
    await rds.delete(keys.instruments)
    async with TickSubscriber(redis_url, client="empty") as sub:
        with pytest.raises(UnknownInstrument, match="no instruments in Redis"):
            await sub.subscribe(["NSE:INFY"])


async def test_blocking_flavour_in_a_thread(publisher, redis_url, rds, keys) -> None:
    def strategy() -> list[dict]:
        with BlockingTickSubscriber(redis_url, client="sync-1") as sub:
            sub.subscribe([INFY], mode="ltp")
            return [sub.get(timeout=10) for _ in range(3)]

    ticks = await asyncio.to_thread(strategy)
    assert [t["instrument_token"] for t in ticks] == [INFY] * 3
    assert all(t["mode"] == "ltp" for t in ticks[1:])
    assert await rds.hgetall(keys.claims("sync-1")) == {}


async def test_blocking_get_times_out_cleanly(publisher, redis_url) -> None:
    def idle() -> bool:
        with BlockingTickSubscriber(redis_url, client="idle") as sub:
            try:
                sub.get(timeout=0.2)
            except queue.Empty:
                return True
        return False

    assert await asyncio.to_thread(idle)


async def test_a_slow_blocking_strategy_is_told_what_it_missed(redis_url, rds, keys, caplog) -> None:
    """Ticks past a full queue are given up, but counted as gaps (``missed``) and warned
    about once per interval, not dropped silently."""
    caplog.set_level(logging.WARNING, logger="kitebus.subscriber")
    sub = BlockingTickSubscriber(redis_url, client="slow", max_queue=5)
    await asyncio.to_thread(sub.__enter__)
    try:
        await asyncio.to_thread(sub.listen, [INFY])  # no claim, no publisher: the test is the bus

        async def publish(seq: int) -> None:
            tick = {"instrument_token": INFY, "mode": "ltp", "tradable": True, "last_price": 1.0 + seq,
                    "received_at_ns": seq, "seq": seq, "epoch": 7}  # fmt: skip
            await rds.publish(keys.ticks(INFY), msgpack.packb(tick))

        for seq in range(1, 21):  # nobody reads: 5 fit in the queue, 15 are given up
            await publish(seq)
        await eventually(lambda: sub.dropped == 15)
        assert sub.missed == 15 and sub.gaps == {INFY: 15}
        warnings = [r for r in caplog.records if "too slow" in r.getMessage()]
        assert len(warnings) == 1 and "queue of 5 ticks is full" in warnings[0].getMessage()
        taken = [await asyncio.to_thread(sub.get, 5) for _ in range(5)]
        assert [t["seq"] for t in taken] == [1, 2, 3, 4, 5]
        await publish(21)  # the next tick follows the last one given up: no new gap
        assert (await asyncio.to_thread(sub.get, 5))["seq"] == 21
        assert sub.missed == 15
    finally:
        await asyncio.to_thread(sub.__exit__, None, None, None)
