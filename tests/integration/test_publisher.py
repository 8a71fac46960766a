"""The publisher against a real redis-server and the simulator over real sockets."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import redis.asyncio as redis
import websockets

from config import Keys
from consumers.control import ControlClient
from publisher.app import Publisher, Tuning
from rediswire import bus
from simulator.server import TickerServer, subscribed
from tests.integration.conftest import FAST, eventually

EQUITY, INDEX, CDS, BCD, NFO = 408065, 256265, 9004 << 8 | 3, 9005 << 8 | 6, 9001 << 8 | 2


async def _ticks(rds: redis.Redis, keys: Keys, tokens, want, timeout=10.0) -> dict[int, list[dict]]:
    """Collect ticks from the per-token channels until ``want(collected)`` holds."""
    pubsub = rds.pubsub()
    await pubsub.subscribe(*(keys.ticks(t) for t in tokens))
    seen: dict[int, list[dict]] = {t: [] for t in tokens}
    try:
        async with asyncio.timeout(timeout):
            while not want(seen):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message:
                    tick = msgpack.unpackb(message["data"])
                    assert message["channel"] == keys.ticks(tick["instrument_token"]).encode()
                    seen[tick["instrument_token"]].append(tick)
    finally:
        await pubsub.aclose()
    return seen


async def test_every_packet_kind_arrives_decoded_on_its_channel(publisher, control, rds, keys) -> None:
    await control.subscribe([EQUITY, CDS], mode="full", client="t")
    await control.subscribe([INDEX], mode="full", client="t")
    await control.subscribe([BCD, 738561], mode="quote", client="t")
    await control.subscribe([NFO, INDEX + 256 * 15], mode="ltp", client="t")  # a second index, ltp
    tokens = [EQUITY, CDS, INDEX, BCD, 738561, NFO, INDEX + 256 * 15]
    seen = await _ticks(rds, keys, tokens, lambda s: all(s.values()))
    full, index, quote, ltp = seen[EQUITY][-1], seen[INDEX][-1], seen[BCD][-1], seen[NFO][-1]
    assert full["mode"] == "full" and len(full["depth"]["buy"]) == 5 and full["received_at_ns"] > 0
    assert index["mode"] == "full" and index["tradable"] is False and "exchange_timestamp" in index
    assert quote["mode"] == "quote" and "depth" not in quote and "ohlc" in quote
    assert ltp["mode"] == "ltp" and set(ltp) == {
        "instrument_token",
        "mode",
        "tradable",
        "last_price",
        "received_at_ns",
        "seq",
        "epoch",
    }
    for ticks in seen.values():  # per token: 1, 2, 3, ... in one epoch, the publisher's
        assert [t["seq"] for t in ticks] == list(range(ticks[0]["seq"], ticks[0]["seq"] + len(ticks)))
        assert {t["epoch"] for t in ticks} == {publisher.epoch}
    assert 50 < seen[CDS][-1]["last_price"] < 150  # USDINR, divided by 10^7
    assert 50 < quote["last_price"] < 150  # BCD, divided by 10^4
    last = await rds.hgetall(keys.last)
    assert msgpack.unpackb(last[str(EQUITY).encode()])["instrument_token"] == EQUITY


async def test_9000_tokens_land_3_by_3000_and_9001st_is_rejected(
    publisher, control, rds, keys, simulator
) -> None:
    tokens = [(n << 8) | 1 for n in range(1, 9001)]
    result = await control.subscribe(tokens, mode="ltp", client="big", timeout=30)
    assert len(result.applied) == 9000
    counts = await rds.hvals(keys.token_conn)
    assert sorted(counts.count(str(i).encode()) for i in range(3)) == [3000, 3000, 3000]
    await eventually(lambda: sorted(len(m) for m in subscribed(simulator).values()) == [3000, 3000, 3000])
    result = await control.request("subscribe", [9001 << 8 | 1, tokens[0]], client="late")
    assert not result.ok and result.rejected == (9001 << 8 | 1,) and result.applied == (tokens[0],)
    assert "capacity full" in result.error
    assert await rds.hlen(keys.token_conn) == 9000


async def test_two_clients_share_a_token(publisher, control, rds, keys, simulator) -> None:
    await control.subscribe([EQUITY], mode="ltp", client="a")
    await control.subscribe([EQUITY], mode="full", client="b")
    assert await rds.hget(keys.token_mode, str(EQUITY)) == b"full"
    await eventually(lambda: any(m.get(EQUITY) == "full" for m in subscribed(simulator).values()))
    await control.unsubscribe([EQUITY], client="b")
    assert await rds.hget(keys.token_mode, str(EQUITY)) == b"ltp"
    await eventually(lambda: any(m.get(EQUITY) == "ltp" for m in subscribed(simulator).values()))
    await control.unsubscribe([EQUITY], client="a")
    assert await rds.hget(keys.token_conn, str(EQUITY)) is None
    await eventually(lambda: all(EQUITY not in m for m in subscribed(simulator).values()))
    assert await rds.smembers(keys.clients) == set()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"op": "drop", "tokens": "1"}, "unknown op"),
        ({"op": "subscribe", "tokens": "408065,abc"}, "bad token"),
        ({"op": "subscribe", "tokens": "1", "mode": "deep"}, "unknown mode"),
        ({"op": "mode", "tokens": "1"}, "missing field 'mode'"),
        ({"tokens": "1"}, "missing field 'op'"),
        ({"op": "subscribe", "tokens": "9" * 300_000}, "too long"),
        ({"op": "subscribe", "tokens": "1", "client": "x y"}, "bad client"),
    ],
)
async def test_bad_requests_are_answered_and_change_nothing(
    publisher, control, rds, keys, fields, error
) -> None:
    await control.subscribe([EQUITY], mode="quote", client="keep")
    before = (
        await rds.hgetall(keys.token_conn),
        await rds.hgetall(keys.token_mode),
        await rds.smembers(keys.clients),
    )
    entry = (await rds.xadd(keys.control, fields)).decode()

    async def result():
        for _, entry_fields in await rds.xrange(keys.control_results):
            if entry_fields[b"request"] == entry.encode():
                return entry_fields
        return None

    answer = await eventually(result)
    assert answer[b"ok"] == b"0" and error in answer[b"error"].decode()
    after = (
        await rds.hgetall(keys.token_conn),
        await rds.hgetall(keys.token_mode),
        await rds.smembers(keys.clients),
    )
    assert after == before
    assert await rds.xpending(keys.control, "publisher") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    assert (await control.subscribe([EQUITY], client="after")).ok  # still serving


async def test_dropped_connection_is_resubscribed_with_the_same_modes(publisher, control, simulator) -> None:
    await control.subscribe([EQUITY, 738561], mode="full", client="a")
    await control.subscribe([INDEX], mode="ltp", client="a")
    before = subscribed(simulator)
    reconnects = sum(c.reconnects for c in publisher.connections)
    assert simulator.drop() == 3
    await eventually(lambda: sum(c.reconnects for c in publisher.connections) >= reconnects + 3)
    await eventually(lambda: sorted(map(sorted, (m.items() for m in subscribed(simulator).values())))
                     == sorted(map(sorted, (m.items() for m in before.values()))))  # fmt: skip
    await eventually(lambda: all(c.state == "live" for c in publisher.connections))


async def test_stalled_connection_is_detected_and_resubscribed(
    publisher, control, simulator, rds, keys
) -> None:
    await control.subscribe([EQUITY], mode="full", client="a")
    index = publisher.book.placement[EQUITY]
    connection = publisher.connections[index]
    session = next(s.id for s in simulator.sessions if EQUITY in s.modes)
    simulator.stall(30, session)
    await eventually(lambda: "stalled" in connection.last_error, timeout=5)
    await eventually(lambda: any(s.modes.get(EQUITY) == "full" and not s.stalled for s in simulator.sessions))
    # Kite streams quote between the resubscribe and the mode message: wait for full ticks
    # (a resubscription without its mode would never bring one)
    await _ticks(rds, keys, [EQUITY], lambda s: s[EQUITY] and s[EQUITY][-1]["mode"] == "full")
    assert (await rds.hget(keys.conn(index), "last_error")).decode().startswith("stalled")


async def test_malformed_frames_and_kite_errors_are_counted_not_fatal(
    publisher, control, simulator, rds, keys
) -> None:
    await control.subscribe([EQUITY], client="a")
    await simulator.send_malformed()
    await simulator.send_error("TokenException: something")
    await eventually(lambda: publisher.sink.malformed >= 5)
    await eventually(lambda: any("TokenException" in c.last_error for c in publisher.connections))
    assert all(c.state == "live" for c in publisher.connections)
    assert await _ticks(rds, keys, [EQUITY], lambda s: s[EQUITY])
    await eventually(lambda: rds.hget(keys.status, "malformed"))
    assert int(await rds.hget(keys.status, "malformed")) >= 5


async def test_bad_access_token_is_reported_as_auth_failed(settings, rds, keys) -> None:
    bad = settings.model_copy(
        update={"kite_access_token": settings.kite_access_token.__class__("expired-xyz")}
    )
    publisher = Publisher(bad, FAST)
    await publisher.start()
    try:
        await eventually(lambda: all(c.state == "auth_failed" for c in publisher.connections))

        async def shown():
            return await rds.hget(keys.conn(0), "state") == b"auth_failed"

        await eventually(shown)
        error = (await rds.hget(keys.conn(0), "last_error")).decode()
        assert "403" in error and "expired-xyz" not in error
        reconnects = publisher.connections[0].reconnects
        await asyncio.sleep(0.2)  # auth_retry is 0.5 s here: no tight loop
        assert publisher.connections[0].reconnects <= reconnects + 1
    finally:
        await publisher.stop()


async def test_status_and_connection_hashes(publisher, control, rds, keys) -> None:
    await control.subscribe([EQUITY, INDEX], mode="quote", client="a")
    await eventually(lambda: rds.hget(keys.status, "tokens"))
    await eventually(lambda: publisher.connections[0].ticks > 0)

    async def status_shows_two():
        return (await rds.hget(keys.status, "tokens")) == b"2"

    await eventually(status_shows_two)
    status = {k.decode(): v.decode() for k, v in (await rds.hgetall(keys.status)).items()}
    assert status["state"] == "running" and status["capacity"] == "9000"
    assert float(status["heartbeat_at"]) >= float(status["started_at"]) > 0
    conn = {k.decode(): v.decode() for k, v in (await rds.hgetall(keys.conn(0))).items()}
    assert conn["state"] == "live" and int(conn["tokens"]) >= 1
    assert float(conn["last_message_at"]) > 0 and int(conn["ticks"]) >= 0


async def test_restore_on_start_and_stop_clears_live_hashes(settings, control, rds, keys, simulator) -> None:
    first = Publisher(settings, FAST)
    await first.start()
    await control.subscribe([EQUITY], mode="full", client="a")
    await control.subscribe([INDEX], mode="ltp", client="b")
    await first.stop()
    assert await rds.exists(keys.token_conn, keys.token_mode) == 0
    assert await rds.hget(keys.status, "state") == b"stopped"
    await rds.xadd(keys.control, {"op": "subscribe", "tokens": "738561", "mode": "quote", "client": "c"})
    second = Publisher(settings, FAST)
    await second.start()
    try:
        assert second.book.in_force == {EQUITY: "full", INDEX: "ltp"}  # restored before any request
        await eventually(lambda: second.book.in_force.get(738561) == "quote")
        await eventually(
            lambda: (
                sorted(t for m in subscribed(simulator).values() for t in m)
                == sorted([EQUITY, INDEX, 738561])
            )
        )
        assert await rds.hget(keys.token_mode, str(EQUITY)) == b"full"
    finally:
        await second.stop()


async def test_control_client_times_out_without_a_publisher(rds) -> None:
    from consumers.control import ControlTimeout

    with pytest.raises(ControlTimeout, match="is the publisher running"):
        await ControlClient(rds, "nobody").request("subscribe", [1], timeout=0.3)


async def test_simulator_fixture_is_used(simulator: TickerServer) -> None:
    assert simulator.url.startswith("ws://127.0.0.1:")


async def test_a_failing_request_is_answered_and_the_loop_goes_on(publisher, control, monkeypatch) -> None:
    connection = publisher.connections[0]
    original = connection.apply

    async def broken(change):
        raise RuntimeError("bug")

    monkeypatch.setattr(connection, "apply", broken)
    result = await control.request("subscribe", [EQUITY], client="a")
    assert not result.ok and "internal error" in result.error
    monkeypatch.setattr(connection, "apply", original)
    assert (await control.subscribe([INDEX], client="b")).ok  # the next request is served


async def test_refused_for_the_api_keys_socket_limit_it_retries_at_a_steady_pace(simulator, settings) -> None:
    """A new leader meets the old one's sockets still open at Kite (HTTP 429): it must not
    back off toward 30 s, but connect within a couple of seconds of them closing."""
    url = f"{simulator.url}?api_key=kitebus&access_token=simulator"
    holders = [await websockets.connect(url) for _ in range(3)]
    publisher = Publisher(settings.model_copy(update={"connections": 1}), Tuning())  # Kite's backoff
    await publisher.start()
    try:
        # refused again and again: with a backoff doubling from 0.5 s, the next try would be 4 s off
        await eventually(lambda: publisher.connections[0].reconnects >= 5, timeout=15)
        assert publisher.connections[0].state != "live" and "429" in publisher.connections[0].last_error
        held = list(simulator.sessions)  # the holders': the publisher may take one the moment it frees
        assert len(held) == 3
        for holder in holders:
            holder.transport.abort()  # as a process that died
        await eventually(lambda: not any(s in simulator.sessions for s in held), timeout=5)
        freed = time.monotonic()
        await eventually(lambda: publisher.connections[0].state == "live", timeout=5)
        assert time.monotonic() - freed < 2.0
    finally:
        await publisher.stop()


async def test_a_request_whose_write_failed_gets_the_result_of_its_one_application(
    publisher, control, rds, keys, monkeypatch
) -> None:
    """Redis goes away between applying a request and writing its batch: the entry comes
    back pending. Applied again, a ``set`` would release nothing and answer so; the client
    must get the result of its one application (which released INDEX), exactly once, and
    Redis must end up as the book says."""
    from rediswire import bus

    assert (await control.subscribe([EQUITY, INDEX], mode="ltp", client="c")).ok
    real, failures = bus.OrderedWrites.execute, []

    async def fail_once(self) -> None:
        if not failures:
            failures.append(1)
            for stage in self.stages:
                await stage.reset()
            raise redis.ConnectionError("Redis went away (test)")
        await real(self)

    monkeypatch.setattr(bus.OrderedWrites, "execute", fail_once)
    result = await control.set_watchlist([EQUITY], mode="ltp", client="c", timeout=15)
    assert failures and result.ok and result.released == (INDEX,)
    assert await rds.hgetall(keys.claims("c")) == {str(EQUITY).encode(): b"ltp"}
    assert publisher.book.in_force == {EQUITY: "ltp"}
    results = await rds.xrange(keys.control_results)
    assert [f[b"request"] for _, f in results].count(result.request.encode()) == 1


async def test_a_request_a_deposed_leader_read_is_answered_by_the_leader(
    publisher, control, monkeypatch
) -> None:
    """A deposed leader reads with the same consumer name; its writes are refused, so the
    entries it took stay pending, and the leader reads its pending entries again now and
    then rather than only after a fault."""
    from publisher import control as control_module

    monkeypatch.setattr(control_module, "PENDING_AGAIN", 0.3)
    real, taken = publisher.redis.xreadgroup, []

    async def losing_the_race(groupname, consumername, streams, *args, **kwargs):
        reply = await real(groupname, consumername, streams, *args, **kwargs)
        if reply and not taken and list(streams.values()) == [">"]:
            taken.append(reply)
            return []  # the other process got it
        return reply

    monkeypatch.setattr(publisher.redis, "xreadgroup", losing_the_race)
    result = await control.subscribe([EQUITY], mode="ltp", client="c", timeout=10)
    assert taken and result.ok and result.applied == (EQUITY,)


async def test_results_already_written_are_looked_up_page_by_page(settings, rds, keys, monkeypatch) -> None:
    """Pending requests are checked against ``{ns}:control:results`` (up to its cap of
    thousands) with bounded reads, and one written late in it is still found."""
    from publisher import control as control_module

    running = Publisher(settings, FAST)  # not started: only its control loop's lookup is used
    try:
        pending = [b"1000-1", b"1000-2", b"1000-3"]
        answered_at = {10: pending[0], 1100: pending[1]}  # pending[2] has no result
        async with rds.pipeline(transaction=False) as pipe:
            for n in range(1200):
                request = answered_at.get(n, f"2000-{n}".encode())
                pipe.xadd(keys.control_results, {"request": request, "op": "subscribe"})
            await pipe.execute()
        counts: list[int | None] = []
        xrange = running.redis.xrange

        async def spy(name, min="-", max="+", count=None):
            counts.append(count)
            return await xrange(name, min=min, max=max, count=count)

        monkeypatch.setattr(running.redis, "xrange", spy)
        entries = [(entry_id, {b"op": b"subscribe"}) for entry_id in pending]
        assert await running.control._answered(entries) == {pending[0], pending[1]}
        assert counts and all(c is not None and c <= control_module.RESULTS_PAGE for c in counts)
        assert len(counts) == 1200 // control_module.RESULTS_PAGE + 1  # every page once, no re-read
        counts.clear()
        assert await running.control._answered(entries[:1]) == {pending[0]}
        assert len(counts) == 1  # found on the first page: no further read
    finally:
        await running.redis.aclose()
        await running.sink.close()


async def test_a_rewrite_from_the_book_never_brings_back_a_claim_released_meanwhile(
    publisher, control, rds, keys, monkeypatch
) -> None:
    """Redis came back empty: the monitor rewrites every claim from the book while the
    control loop releases one. A rewrite built before the release and sent after it would
    put the claim back in Redis, where the next publisher would restore it."""
    assert (await control.subscribe([EQUITY, INDEX], client="a")).ok
    built, go = asyncio.Event(), asyncio.Event()
    real_execute = bus.OrderedWrites.execute

    async def execute_later(writes):  # the rewrite's writes, held between being built and sent
        built.set()
        await go.wait()
        return await real_execute(writes)

    lock = publisher.control._writing  # the control loop waits for it, or (the bug) goes on
    waited = asyncio.Event()
    acquire = lock.acquire

    async def noted_acquire():
        if lock.locked():
            waited.set()
        return await acquire()

    monkeypatch.setattr(lock, "acquire", noted_acquire)
    monkeypatch.setattr(bus.OrderedWrites, "execute", execute_later)
    rewrite = asyncio.create_task(publisher.control.write_all())
    await asyncio.wait_for(built.wait(), 5)
    monkeypatch.setattr(bus.OrderedWrites, "execute", real_execute)
    release = asyncio.create_task(control.unsubscribe([INDEX], client="a"))
    await eventually(lambda: waited.is_set() or release.done())
    go.set()
    await rewrite
    assert (await release).applied == (INDEX,)
    assert await rds.hgetall(keys.claims("a")) == {str(EQUITY).encode(): b"quote"}
    assert publisher.book.claims["a"] == {EQUITY: "quote"}


async def test_after_the_primary_moved_the_state_is_written_again_from_the_book(
    publisher, control, rds, keys, monkeypatch
) -> None:
    """A failover: what the old primary took in its last moments (a claim, a released
    token's HDEL) may be missing on the new one. The control loop writes it all again."""
    assert (await control.subscribe([EQUITY], client="a")).ok
    moves = [0]
    monkeypatch.setattr(bus, "primary_moves", lambda client: moves[0])
    await rds.delete(keys.claims("a"), keys.token_conn)  # lost with the old primary
    await rds.hset(keys.last, "999", b"stale")  # a released token's snapshot, its HDEL lost
    moves[0] += 1
    await eventually(lambda: rds.hgetall(keys.claims("a")))
    assert await rds.hgetall(keys.claims("a")) == {str(EQUITY).encode(): b"quote"}
    assert await rds.hget(keys.token_conn, str(EQUITY)) is not None
    assert not await rds.hexists(keys.last, "999")
