"""Daily operations on watchlists, watched at the simulator: op set never opens a gap."""

from __future__ import annotations

import dataclasses

import pytest

from consumers.control import SubscriptionRejected
from consumers.subscriber import TickSubscriber
from publisher.app import Publisher
from simulator.server import subscribed
from tests.integration.conftest import FAST, eventually

A, B, C, D = 408065, 2953217, 341249, 1270529  # INFY, TCS, HDFCBANK, ICICIBANK


def _at_kite(simulator) -> dict[int, str]:
    return {t: m for modes in subscribed(simulator).values() for t, m in modes.items()}


def _unsubscribed_at_kite(simulator) -> set[int]:
    return {t for s in simulator.sessions for t in s.unsubscribed}


async def test_set_replaces_a_watchlist_and_what_stays_is_never_unsubscribed(
    simulator, publisher, control, rds, keys
) -> None:
    await control.subscribe([A, B, C], mode="quote", client="w")
    await eventually(lambda: _at_kite(simulator) == {A: "quote", B: "quote", C: "quote"})

    result = await control.set_watchlist([B, C, D], mode="full", client="w")
    assert result.ok and result.applied == (B, C, D) and result.released == (A,)
    await eventually(lambda: _at_kite(simulator) == {B: "full", C: "full", D: "full"})
    assert _unsubscribed_at_kite(simulator) == {A}  # B and C stayed subscribed throughout
    assert await rds.hgetall(keys.claims("w")) == {str(t).encode(): b"full" for t in (B, C, D)}
    assert set(await rds.hkeys(keys.token_conn)) == {str(t).encode() for t in (B, C, D)}


async def test_set_with_a_bad_token_is_rejected_and_changes_nothing(simulator, publisher, control, rds, keys):
    await control.subscribe([A, B], mode="quote", client="w")
    before = await rds.hgetall(keys.claims("w"))
    result = await control.request("set", ["408065", "12x"], mode="full", client="w")
    assert not result.ok and "bad token" in result.error
    assert await rds.hgetall(keys.claims("w")) == before
    assert publisher.book.claims["w"] == {A: "quote", B: "quote"}


async def test_set_beyond_capacity_is_all_or_nothing(simulator, settings, redis_url, control) -> None:
    small = Publisher(settings.model_copy(update={"connections": 1, "tokens_per_connection": 2}), FAST)
    await small.start()
    try:
        await control.subscribe([A], client="other")
        await control.subscribe([B], client="w")
        with pytest.raises(SubscriptionRejected, match="nothing changed"):
            await control.set_watchlist([C, D], client="w")  # needs 2, only B's place frees up
        assert small.book.claims == {"other": {A: "quote"}, "w": {B: "quote"}}
    finally:
        await small.stop()


async def test_the_library_listens_to_exactly_the_new_watchlist(simulator, publisher, redis_url) -> None:
    async with TickSubscriber(redis_url, client="lib") as sub:
        await sub.subscribe([A, B])
        await sub.set_watchlist([B, C], mode="ltp")
        assert sub.claimed == {B, C} and sub.listened == {B, C}

        async def only_new() -> bool:
            ticks = await sub.batch(limit=10_000, wait=0.2)
            return bool(ticks) and {t["instrument_token"] for t in ticks} <= {B, C}

        await eventually(only_new)


async def _results(rds, keys, op: str) -> list[dict]:
    entries = await rds.xrange(keys.control_results)
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries if f[b"op"] == op.encode()]


async def test_a_ttl_claim_lapses_by_itself_as_a_normal_release(simulator, publisher, control, rds, keys):
    await control.subscribe([A], mode="ltp", client="lasting")
    await control.subscribe([A, B], mode="full", client="news", ttl=1.0)
    assert await rds.hkeys(keys.deadlines("news")) != []
    await eventually(lambda: _at_kite(simulator) == {A: "full", B: "full"})

    await eventually(lambda: _at_kite(simulator) == {A: "ltp"}, timeout=5)  # B released, A back to ltp
    expired = await _results(rds, keys, "expire")
    assert len(expired) == 1 and expired[0]["client"] == "news" and expired[0]["applied"] == f"{A},{B}"
    assert expired[0]["ok"] == "1" and expired[0]["request"] == ""
    assert await rds.hgetall(keys.claims("news")) == {} and await rds.hgetall(keys.deadlines("news")) == {}
    assert publisher.book.claims == {"lasting": {A: "ltp"}}


async def test_a_claims_deadline_survives_a_publisher_restart(simulator, settings, control, rds, keys):
    first = Publisher(settings, FAST)
    await first.start()
    await control.subscribe([C], mode="quote", client="news", ttl=2.0)
    await first.stop()
    second = Publisher(settings, FAST)
    await second.start()
    try:
        assert second.book.deadlines["news"][C] == pytest.approx(first.book.deadlines["news"][C], abs=0.01)
        await eventually(lambda: C not in second.book.placement, timeout=6)
        assert len(await _results(rds, keys, "expire")) == 1
    finally:
        await second.stop()


async def test_a_subscribe_is_followed_by_live_once_each_new_token_ticked(simulator, publisher, control, rds):
    await control.subscribe([A], client="early")
    result = await control.subscribe([A, B], mode="quote", client="w")
    live = await control.wait_live(result, timeout=10)
    assert live.ok and live.op == "live" and set(live.applied) == {A, B} and live.rejected == ()
    async with TickSubscriber(rds, client="lib") as sub:
        await sub.subscribe([C])  # waits for the live follow-up by default
        assert sub.silent == set()
        ticks = await sub.batch(wait=2)
        assert C in {t["instrument_token"] for t in ticks}  # the snapshot is there at once


async def test_a_token_that_never_ticks_is_named_silent(simulator, settings, control) -> None:
    quick = dataclasses.replace(FAST, stall_timeout=10.0, live_timeout=0.5)
    running = Publisher(settings, quick)
    await running.start()
    try:
        await eventually(lambda: all(c.state == "live" for c in running.connections))
        simulator.stall(5)  # nothing from Kite for a while
        result = await control.subscribe([D], client="w")
        live = await control.wait_live(result, timeout=5)
        assert not live.ok and live.rejected == (D,) and f"no tick within 0.5s from: {D}" in live.error
    finally:
        await running.stop()
