"""The KiteTicker drop-in on the real stack: one strategy, the same ticks; failures reach callbacks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

from consumers.kiteticker import KiteTicker
from publisher.app import Publisher
from simulator.market import Market
from tests.integration.conftest import FAST, eventually

STRATEGY = Path(__file__).with_name("compat_strategy.py")
INFY, TCS, ITC, NIFTY, BANKNIFTY = 408065, 2953217, 424961, 256265, 260105


def _marker_ticks() -> tuple[dict[int, float], list[dict]]:
    """A full-mode tick per token with a last_price the market never shows."""
    market, now = Market(99), int(time.time())
    markers = {INFY: 9999.95, TCS: 8888.85, ITC: 7777.75, NIFTY: 11111.15, BANKNIFTY: 12121.25}
    ticks = [market.tick(token, "full", now) | {"last_price": price} for token, price in markers.items()]
    return markers, ticks


async def test_the_same_strategy_sees_the_same_ticks_through_kiteconnect_and_the_drop_in(
    simulator, settings, control
) -> None:
    # Two publisher connections, so the official client may open the api_key's third.
    publisher = Publisher(settings.model_copy(update={"connections": 2}), FAST)
    await publisher.start()
    try:
        await _compare_official_and_drop_in(simulator, settings, control)
    finally:
        await publisher.stop()


async def _compare_official_and_drop_in(simulator, settings, control) -> None:
    # Another bus client holds TCS in full: the drop-in must still deliver it in quote, as Kite would.
    await control.subscribe([TCS], mode="full", client="someone-else")
    markers, ticks = _marker_ticks()
    env = {**os.environ, "REDIS_URL": settings.redis_url, "KITEBUS_NAMESPACE": "kite"}
    arg = json.dumps(markers)
    runs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(STRATEGY), *command, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for command in (["official", simulator.url, arg], ["bus", arg])
    ]
    outputs = [asyncio.create_task(run.communicate()) for run in runs]
    async with asyncio.timeout(60):
        while not all(o.done() for o in outputs):
            await simulator.send_ticks(ticks)  # again and again: each ticker takes it once it is ready
            await asyncio.sleep(0.3)
    (official_out, official_err), (bus_out, bus_err) = [o.result() for o in outputs]
    assert runs[0].returncode == 0, official_err.decode()[-2000:]
    assert runs[1].returncode == 0, bus_err.decode()[-2000:]
    official, bus = json.loads(official_out), json.loads(bus_out)
    assert official["errors"] == [] and bus["errors"] == []
    assert set(official["ticks"]) == {str(t) for t in markers}
    modes = {int(t): tick["mode"][1] for t, tick in official["ticks"].items()}
    assert modes == {INFY: "full", NIFTY: "full", ITC: "ltp", TCS: "quote", BANKNIFTY: "quote"}
    assert bus["ticks"] == official["ticks"]  # tokens, modes, field names, types and values


def _ticker(settings, **kwargs) -> KiteTicker:
    return KiteTicker("ignored", "ignored", redis_url=settings.redis_url, namespace="kite", **kwargs)


async def _run_threaded(ticker: KiteTicker) -> None:
    ticker.connect(threaded=True)


async def test_ticks_arrive_in_batches_and_close_releases_the_claims(
    simulator, publisher, settings, rds, keys
) -> None:
    ticker = _ticker(settings, client="dropin-1")
    batches: list[list[dict]] = []
    connected = threading.Event()
    closed: list[tuple] = []
    ticker.on_connect = lambda ws, response: (connected.set(), ws.subscribe([INFY, NIFTY]))
    ticker.on_ticks = lambda ws, ticks: batches.append(ticks)
    ticker.on_close = lambda ws, code, reason: closed.append((code, reason))
    await _run_threaded(ticker)
    await eventually(connected.is_set)
    await eventually(lambda: {t["instrument_token"] for b in batches for t in b} == {INFY, NIFTY})
    assert ticker.is_connected()
    assert all(t["mode"] == "quote" and "received_at_ns" not in t for b in batches for t in b)
    assert await rds.hgetall(keys.claims("dropin-1")) == {b"408065": b"quote", b"256265": b"quote"}

    await asyncio.to_thread(ticker.close)  # it waits for the publisher, which runs in this loop
    await asyncio.to_thread(ticker.websocket_thread.join, 10)
    assert not ticker.websocket_thread.is_alive()
    assert closed == [(1000, "closed by the client")]
    assert not ticker.is_connected()
    assert await rds.hgetall(keys.claims("dropin-1")) == {}


async def test_no_publisher_running_is_an_error_then_noreconnect_and_connect_returns(redis_url) -> None:
    ticker = KiteTicker(redis_url=redis_url, namespace="nobody-here", reconnect=False)
    events: list[str] = []
    ticker.on_error = lambda ws, code, reason: events.append(f"error {code} {reason}")
    ticker.on_noreconnect = lambda ws: events.append("noreconnect")
    ticker.on_connect = lambda ws, response: events.append("connect")
    await asyncio.wait_for(asyncio.to_thread(ticker.connect), 20)  # returns: it gave up
    assert events[-1] == "noreconnect" and "connect" not in events
    assert "no publisher running on the bus" in events[0]


async def test_rejected_tokens_reach_on_error_by_name(simulator, settings) -> None:
    small = settings.model_copy(update={"connections": 1, "tokens_per_connection": 1})
    running = Publisher(small, FAST)
    await running.start()
    await eventually(lambda: all(c.state == "live" for c in running.connections))
    try:
        ticker = _ticker(settings, client="dropin-2")
        errors: list[str] = []
        ticker.on_connect = lambda ws, response: ws.subscribe([INFY, TCS])
        ticker.on_error = lambda ws, code, reason: errors.append(reason)
        await _run_threaded(ticker)
        await eventually(lambda: errors)
        assert "subscribe rejected by the publisher" in errors[0] and str(TCS) in errors[0]
        await asyncio.to_thread(ticker.close)
        await asyncio.to_thread(ticker.websocket_thread.join, 10)
    finally:
        await running.stop()


async def test_a_stopped_publisher_is_a_close_then_a_reconnect_that_resubscribes(simulator, settings) -> None:
    first = Publisher(settings, FAST)
    await first.start()
    ticker = _ticker(settings, client="dropin-3", reconnect_max_delay=5)
    events: list[str] = []
    seen: list[int] = []
    ticker.on_connect = lambda ws, response: events.append("connect") or ws.subscribe([INFY])
    ticker.on_close = lambda ws, code, reason: events.append(f"close {code}")
    ticker.on_reconnect = lambda ws, attempts: events.append("reconnect")
    ticker.on_ticks = lambda ws, ticks: seen.extend(t["instrument_token"] for t in ticks)
    await _run_threaded(ticker)
    try:
        await eventually(lambda: INFY in seen)
        await first.stop()
        await eventually(lambda: "close 1006" in events, timeout=15)
        assert "reconnect" in events
        second = Publisher(settings, FAST)
        await second.start()
        try:
            seen.clear()
            await eventually(lambda: events.count("connect") >= 2, timeout=30)
            await eventually(lambda: INFY in seen)
        finally:
            await asyncio.to_thread(ticker.close)
            await asyncio.to_thread(ticker.websocket_thread.join, 10)
            await second.stop()
    finally:
        await asyncio.to_thread(ticker.close)


async def test_a_dropped_kite_connection_at_the_publisher_is_an_error_and_not_connected(
    simulator, publisher, settings
) -> None:
    ticker = _ticker(settings, client="dropin-4")
    errors: list[str] = []
    seen: list[int] = []
    ticker.on_connect = lambda ws, response: ws.subscribe([INFY])
    ticker.on_error = lambda ws, code, reason: errors.append(f"{code} {reason}")
    ticker.on_ticks = lambda ws, ticks: seen.extend(t["instrument_token"] for t in ticks)
    await _run_threaded(ticker)
    try:
        await eventually(lambda: INFY in seen and ticker.is_connected())
        simulator.drop()
        await eventually(lambda: any(e.startswith("1006 stream stale for 408065") for e in errors))
        seen.clear()
        await eventually(lambda: INFY in seen and ticker.is_connected())  # back once the publisher is
    finally:
        await asyncio.to_thread(ticker.close)
        await asyncio.to_thread(ticker.websocket_thread.join, 10)


ORDER_CLIENT = Path(__file__).with_name("order_client.py")


async def test_on_order_update_gets_what_kiteconnect_gets_from_kite(simulator, settings) -> None:
    """The official client on its own socket and the drop-in on the bus, the same updates:
    the drop-in's come from the publisher's two sockets (the third is kiteconnect's), once
    each, as Kite's dicts."""
    publisher = Publisher(settings.model_copy(update={"connections": 2}), FAST)
    await publisher.start()
    env = {**os.environ, "REDIS_URL": settings.redis_url, "KITEBUS_NAMESPACE": "kite"}
    runs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(ORDER_CLIENT), *command, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for command in (["official", simulator.url, "6"], ["bus", "6"])
    ]  # fmt: skip
    try:
        async with asyncio.timeout(40):
            for run in runs:
                assert run.stdout is not None
                assert (await run.stdout.readline()).strip() == b"connected"
            placed = await simulator.order("place", tradingsymbol="INFY", quantity=10, price=1500.0)
            for quantity in (2, 2, 3):  # three partial fills, two of them alike but for the figures
                await simulator.order("fill", order_id=placed["order_id"], quantity=quantity)
            await simulator.order("cancel", order_id=placed["order_id"])
            await simulator.order("place", tradingsymbol="TCS", quantity=1, reject="RMS: blocked")
            (official_out, official_err), (bus_out, bus_err) = [await run.communicate() for run in runs]
    finally:
        await publisher.stop()
    assert runs[0].returncode == 0, official_err.decode()[-2000:]
    assert runs[1].returncode == 0, bus_err.decode()[-2000:]
    official, bus = json.loads(official_out), json.loads(bus_out)
    assert [u["status"] for u in official] == ["OPEN", "UPDATE", "UPDATE", "UPDATE", "CANCELLED", "REJECTED"]
    assert bus == official  # the same dicts, in the same order, each once
