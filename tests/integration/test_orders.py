"""Order updates on the real stack: the simulator sends each on every socket of the account,
as Kite does; the publisher puts each distinct one once, in order, on the stream and the
channel ``{ns}:orders``; the library and the drop-in's ``on_order_update`` get them."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console

from config import load_settings
from config.keys import Keys
from consumers.kiteticker import KiteTicker
from consumers.status import read_status, render_status
from consumers.subscriber import BlockingTickSubscriber, TickSubscriber
from kitebus.localredis import LocalRedis
from publisher.app import Publisher
from publisher.lease import Fence
from publisher.monitor import _Metrics
from publisher.order_feed import OrderFeed
from simulator.server import TickerServer
from tests.integration.conftest import FAST, eventually

KEYS = Keys("kite")


class Channel:
    """Everything published on ``{ns}:orders``, decoded, in order."""

    def __init__(self, url: str) -> None:
        self._client = redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self.messages: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Channel:
        await self._pubsub.subscribe(KEYS.orders)
        await self._pubsub.get_message(timeout=1)  # the subscribe confirmation: listening from here

        async def read() -> None:
            while True:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    self.messages.append(msgpack.unpackb(message["data"]))

        self._task = asyncio.create_task(read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()


class DropIn:
    """A ``KiteTicker`` drop-in in its thread, keeping what ``on_order_update`` got."""

    def __init__(self, url: str, **options: Any) -> None:
        self.ticker = KiteTicker("kitebus", "ignored", redis_url=url, namespace="kite", **options)
        self.updates: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.ticker.on_connect = lambda ws, response: self.connected.set()
        self.ticker.on_order_update = lambda ws, data: self.updates.append(data)

    async def __aenter__(self) -> DropIn:
        self.ticker.connect(threaded=True)
        await eventually(self.connected.is_set)  # its reader's start is fixed before on_connect
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ticker.close()
        assert self.ticker.websocket_thread is not None
        await asyncio.to_thread(self.ticker.websocket_thread.join, 10)


async def _stream(rds: redis.Redis) -> list[dict[str, str]]:
    entries = await rds.xrange(KEYS.orders)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def _an_order_life(simulator: TickerServer, symbol: str = "SBIN") -> list[dict[str, Any]]:
    """Placed, modified, filled in three parts of which two have the same status: 5 updates."""
    placed = await simulator.order("place", tradingsymbol=symbol, quantity=10, price=960.0)
    order_id = placed["order_id"]
    return [
        placed,
        await simulator.order("modify", order_id=order_id, price=961.0),
        await simulator.order("fill", order_id=order_id, quantity=3),
        await simulator.order("fill", order_id=order_id, quantity=3),  # UPDATE again, other figures
        await simulator.order("fill", order_id=order_id),
    ]


async def _check_everywhere(
    sent: list[dict], rds: redis.Redis, channel: Channel, dropin: DropIn, simulator: TickerServer
) -> None:
    """Each sent update once, in the order sent, on the stream, the channel and on_order_update:
    one more order is placed and awaited everywhere, so a late copy would be before it."""
    marker = await simulator.order("place", tradingsymbol="TCS", quantity=1)
    on_channel = {**marker, "account": "default"}
    await eventually(lambda: marker in dropin.updates and on_channel in channel.messages)
    async def written() -> bool:
        return await rds.xlen(KEYS.orders) > len(sent)

    await eventually(written)
    assert dropin.updates.pop() == marker and channel.messages.pop() == on_channel
    entries = (await _stream(rds))[:-1]
    assert json.loads((await _stream(rds))[-1]["data"]) == marker
    assert [json.loads(e["data"]) for e in entries] == sent
    assert [(e["account"], e["order_id"], e["status"]) for e in entries] == [
        ("default", u["order_id"], u["status"]) for u in sent
    ]
    assert channel.messages == [{**u, "account": "default"} for u in sent]
    assert dropin.updates == sent


async def test_updates_sent_on_all_three_sockets_arrive_once_each_in_order_everywhere(
    simulator, publisher, rds, redis_url
) -> None:
    async with Channel(redis_url) as channel, DropIn(redis_url) as dropin:
        sent = await _an_order_life(simulator)
        sent += [await simulator.order("place", tradingsymbol="INFY", quantity=5, reject="RMS: margin")]
        sent += await _an_order_life(simulator, "TCS")
        await _check_everywhere(sent, rds, channel, dropin, simulator)
    assert len(simulator.sessions) == 3  # each was sent on three sockets
    fills = [u for u in sent if u["status"] == "UPDATE" and u["filled_quantity"]]
    assert len(fills) == 4 and len({u["filled_quantity"] for u in fills}) == 2  # kept apart, not merged
    assert publisher.orders.published == len(sent) + 1  # and the marker
    assert publisher.orders.duplicates == 2 * (len(sent) + 1)


async def test_the_same_while_one_socket_is_cut_again_and_again(simulator, publisher, rds, redis_url) -> None:
    async with Channel(redis_url) as channel, DropIn(redis_url) as dropin:
        sent: list[dict] = []
        for round_ in range(6):
            victim = simulator.sessions[round_ % 3].id
            simulator.refuse_connections(0.5)
            simulator.drop(victim)  # down while the updates go out: the other two carry them
            await eventually(lambda: len(simulator.sessions) == 2)
            sent += await _an_order_life(simulator)
            await eventually(lambda: len(simulator.sessions) == 3 and all(
                c.state == "live" for c in publisher.connections), timeout=15)  # fmt: skip
        await _check_everywhere(sent, rds, channel, dropin, simulator)
    assert sum(c.reconnects for c in publisher.connections) >= 6


async def test_an_exact_copy_is_one_update_and_a_partial_fill_with_other_figures_is_another(
    simulator, publisher, rds
) -> None:
    placed = await simulator.order("place", tradingsymbol="SBIN", quantity=10, price=960.0)
    part = await simulator.order("fill", order_id=placed["order_id"], quantity=5)
    await simulator.send_order(dict(part))  # Kite saying the same thing again: no new figure
    rest = await simulator.order("fill", order_id=placed["order_id"], quantity=4)  # UPDATE, 9 filled
    await eventually(lambda: publisher.orders.received == 12)
    await eventually(lambda: publisher.orders.buffered == 0)
    assert [json.loads(e["data"]) for e in await _stream(rds)] == [placed, part, rest]


async def test_a_reader_that_restarts_or_loses_redis_picks_up_where_it_stopped(
    simulator, publisher, rds, redis_url
) -> None:
    first = await _an_order_life(simulator)
    async with TickSubscriber(redis_url, client="strategy") as sub:
        reader = sub.order_updates("0")  # everything the stream keeps
        got = [await reader.next(5) for _ in range(3)]
        assert [u.data for u in got] == first[:3]  # type: ignore[union-attr]
        saved = reader.last_id
    # the strategy is gone; more updates come meanwhile
    second = await _an_order_life(simulator)
    async with TickSubscriber(redis_url, client="strategy") as sub:
        reader = sub.order_updates(saved)
        got = [await reader.next(5) for _ in range(7)]
        assert [u.data for u in got] == first[3:] + second  # type: ignore[union-attr]
        assert reader.trimmed is False
        # Redis cuts the reader's connection while it waits: it reads on after the last one
        waiting = asyncio.create_task(reader.next(10))
        killed = await eventually(lambda: _kill_client(rds, "xread"))
        third = await _an_order_life(simulator)
        assert (await waiting).data == third[0]  # type: ignore[union-attr]
        assert [(await reader.next(5)).data for _ in range(4)] == third[1:]  # type: ignore[union-attr]
        assert killed and reader.reconnects >= 1


async def test_one_program_reads_ticks_and_order_updates_async_and_blocking(
    simulator, publisher, redis_url
) -> None:
    infy = 408065
    async with TickSubscriber(redis_url, client="both") as sub:
        await sub.subscribe([infy])
        reader = sub.order_updates()
        await reader.start()

        async def first_tick() -> dict:
            async for tick in sub:
                return tick
            raise AssertionError

        tick = asyncio.create_task(first_tick())
        placed = await simulator.order("place", tradingsymbol="INFY", quantity=1)
        assert (await reader.next(5)).data == placed  # type: ignore[union-attr]
        assert (await asyncio.wait_for(tick, 5))["instrument_token"] == infy

    def blocking() -> tuple[dict, dict, str]:
        with BlockingTickSubscriber(redis_url, client="sync") as sync:
            sync.subscribe([infy])
            orders = sync.order_updates("0")
            update = orders.get(timeout=5)
            with pytest.raises(queue.Empty):
                orders.get(timeout=0.2)
            return sync.get(timeout=5), update.data, orders.last_id

    tick_seen, update_seen, last = await asyncio.to_thread(blocking)
    assert tick_seen["instrument_token"] == infy and update_seen == placed
    assert last == (await rds_last_id(redis_url))


async def rds_last_id(redis_url: str) -> str:
    client = redis.from_url(redis_url)
    try:
        return (await client.xrevrange(KEYS.orders, count=1))[0][0].decode()
    finally:
        await client.aclose()


async def test_a_reader_resuming_after_entries_were_trimmed_away_says_so(
    simulator, publisher, rds, redis_url
) -> None:
    await _an_order_life(simulator)
    await eventually(lambda: publisher.orders.published == 5)
    first = (await rds.xrange(KEYS.orders, count=1))[0][0].decode()
    await rds.xtrim(KEYS.orders, maxlen=2, approximate=False)  # as the cap does, given time
    async with TickSubscriber(redis_url) as sub:
        reader = sub.order_updates(first)
        got = [await reader.next(5) for _ in range(2)]
        assert reader.trimmed and [u.status for u in got] == ["UPDATE", "COMPLETE"]  # type: ignore[union-attr]
        untouched = sub.order_updates(got[-1].id)  # type: ignore[union-attr]
        assert await untouched.next(0.2) is None and not untouched.trimmed


async def _kill_client(rds: redis.Redis, command: str) -> bool:
    """CLIENT KILL the connection whose last command is ``command`` (False: none is)."""
    for client in await rds.client_list():
        if client["cmd"] == command:
            await rds.client_kill_filter(_id=client["id"])
            return True
    return False


async def test_an_update_sent_while_redis_is_away_reaches_the_stream_once_redis_is_back(
    simulator, tmp_path
) -> None:
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()
    server = LocalRedis(tmp_path / "first")
    server.start()
    settings = load_settings(
        kite_ws_url=simulator.url, redis_url=server.url, kite_api_key="kitebus", kite_access_token="simulator"
    )
    publisher = Publisher(settings, FAST)
    await publisher.start()
    try:
        await eventually(lambda: all(c.state == "live" for c in publisher.connections))
        before = await _an_order_life(simulator)
        await eventually(lambda: publisher.orders.published == 5)
        publisher.orders.max_buffered = 3  # a small bound, to see it hold
        server.stop()
        placed = await simulator.order("place", tradingsymbol="INFY", quantity=10, price=1500.0)
        await eventually(lambda: publisher.orders.problem)  # it tried, Redis is away: kept
        assert publisher.orders.buffered == 1 and publisher.orders.given_up == 0
        server = LocalRedis(tmp_path / "second", port=server.port)
        server.start()  # empty: what was written before is gone with it
        rds = redis.from_url(server.url)
        try:
            await eventually(lambda: publisher.orders.published == 6)
            assert [json.loads(e["data"]) for e in await _stream(rds)] == [placed]
            assert before  # (gone with the first Redis's data)
            server.stop()  # away again, and more updates than the bound meanwhile
            order_id = placed["order_id"]
            updates = [await simulator.order("fill", order_id=order_id, quantity=1) for _ in range(4)]
            updates.append(await simulator.order("cancel", order_id=placed["order_id"]))
            await eventually(lambda: publisher.orders.given_up == 2)  # the two oldest
            server = LocalRedis(tmp_path / "third", port=server.port)
            server.start()
            await rds.aclose()
            rds = redis.from_url(server.url)
            await eventually(lambda: publisher.orders.published == 9, timeout=15)
            assert [json.loads(e["data"]) for e in await _stream(rds)] == updates[2:]
            await eventually(lambda: _status_with(rds, order_given_up=b"2", order_updates=b"9"))
        finally:
            await rds.aclose()
    finally:
        await publisher.stop()
        server.stop()


async def _status_with(rds: redis.Redis, **fields: bytes) -> bool:
    status = await rds.hgetall(KEYS.status)
    return all(status.get(name.encode()) == value for name, value in fields.items())


async def test_each_account_s_updates_carry_it_and_the_library_filters_by_it(
    redis_url, rds, monkeypatch
) -> None:
    second = {"name": "b", "api_key": "kitebus-2", "access_token": "simulator-2"}
    monkeypatch.setenv("KITEBUS_ACCOUNTS", json.dumps([second]))
    async with TickerServer(heartbeat_interval=0.2, accounts={"kitebus-2": "simulator-2"}) as simulator:
        settings = load_settings(
            kite_ws_url=simulator.url, redis_url=redis_url, kite_api_key="kitebus",
            kite_access_token="simulator", connections=2,
        )  # fmt: skip
        publisher = Publisher(settings, FAST)
        await publisher.start()
        try:
            await eventually(lambda: len(simulator.sessions) == 4)
            dropin = DropIn(redis_url)
            dropin.ticker = KiteTicker("kitebus-2", "x", redis_url=redis_url, namespace="kite")  # b's api_key
            dropin.ticker.on_connect = lambda ws, response: dropin.connected.set()
            dropin.ticker.on_order_update = lambda ws, data: dropin.updates.append(data)
            assert dropin.ticker.account == "b"
            async with Channel(redis_url) as channel, dropin:
                ours = await simulator.order("place", tradingsymbol="SBIN", quantity=1)
                theirs = await simulator.order("place", "kitebus-2", tradingsymbol="SBIN", quantity=2)
                await eventually(lambda: len(channel.messages) == 2 and dropin.updates)
            assert [e["account"] for e in await _stream(rds)] == ["default", "b"]
            assert channel.messages == [{**ours, "account": "default"}, {**theirs, "account": "b"}]
            assert dropin.updates == [theirs]
            async with TickSubscriber(redis_url) as sub:
                only_b = [u async for u in _take(sub.order_updates("0", account="b"), 1)]
                every = [u async for u in _take(sub.order_updates("0"), 2)]
            assert [u.data for u in only_b] == [theirs] and [u.account for u in every] == ["default", "b"]
        finally:
            await publisher.stop()


async def _take(reader: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    for _ in range(n):
        yield await asyncio.wait_for(reader.__anext__(), 5)


async def test_kite_error_and_message_texts_are_counted_per_connection_shown_and_errors_go_on_stream_status(
    simulator, publisher, redis_url, rds
) -> None:
    pubsub = rds.pubsub()
    await pubsub.subscribe(KEYS.stream_status)
    session = simulator.sessions[0].id
    await simulator.send_error("Invalid instrument token 99", session)
    await simulator.send_raw(json.dumps({"type": "message", "data": "market closes soon"}), session)
    await eventually(lambda: sum(c.kite_errors for c in publisher.connections) == 1)
    conn = next(c for c in publisher.connections if c.kite_errors)
    assert conn.kite_messages == 1 and conn.last_kite_message == "market closes soon"
    notice = await eventually(lambda: _next_message(pubsub))
    assert notice["status"] == "kite_error" and notice["tokens"] == [] and notice["connection"] == conn.index
    assert notice["reason"] == "Invalid instrument token 99"
    await eventually(lambda: _conn_field(rds, conn.index, b"kite_errors", b"1"))
    data = await read_status(rds, KEYS, sample=0)
    row = data["connections"][conn.index]
    assert (row["kite_errors"], row["kite_messages"]) == (1, 1)
    assert row["last_kite_error"] == "kite: Invalid instrument token 99"
    assert 0 <= row["last_kite_error_age"] < 10

    console = Console(record=True, width=200)
    render_status(data, console)
    text = console.export_text()
    assert f"kite texts on connection {conn.index}: 1 error(s), 1 message(s); last " in text
    assert "ago: kite: Invalid instrument token 99" in text
    await pubsub.aclose()


async def _next_message(pubsub: Any) -> dict[str, Any] | None:
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
    return msgpack.unpackb(message["data"]) if message else None


async def _conn_field(rds: redis.Redis, index: int, field: bytes, value: bytes) -> bool:
    return (await rds.hget(KEYS.conn(index), field)) == value


async def test_bad_texts_are_counted_logged_at_most_once_a_second_never_fatal_never_published(
    simulator, publisher, rds, redis_url, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="kitebus.orders")
    huge = json.dumps({"type": "order", "data": {"order_id": "1", "tag": "x" * 70_000}})
    bad = ["{not json", json.dumps({"type": "order", "data": {"status": "OPEN"}}), huge,
           json.dumps({"type": "order", "data": "text"}), "[]", json.dumps({"type": "order", "data": {
               "order_id": "2", "quantity": 10**30}})]  # fmt: skip
    async with Channel(redis_url) as channel:
        for _ in range(5):
            for text in bad:
                await simulator.send_raw(text)
        await eventually(lambda: publisher.orders.malformed == 5 * len(bad) * 3)
        lines = [r for r in caplog.records if "malformed text" in r.getMessage()]
        assert 1 <= len(lines) <= 3  # a burst of 90: a line, and one a second at most after it
        assert all(c.state == "live" for c in publisher.connections)
        assert sum(c.reconnects for c in publisher.connections) == 0
        good = await simulator.order("place", tradingsymbol="SBIN", quantity=1)  # the feed goes on
        await eventually(lambda: channel.messages)
        assert channel.messages == [{**good, "account": "default"}]
    assert [json.loads(e["data"]) for e in await _stream(rds)] == [good]
    malformed = str(5 * len(bad) * 3).encode()
    await eventually(lambda: _status_with(rds, order_malformed=malformed, order_updates=b"1"))
    registry = CollectorRegistry()
    registry.register(_Metrics(publisher.monitor))
    metrics = generate_latest(registry).decode()
    assert f"kitebus_order_malformed_total {5 * len(bad) * 3}.0" in metrics
    assert "kitebus_order_updates_total 1.0" in metrics and "kitebus_order_duplicates_total 2.0" in metrics
    assert "kitebus_order_given_up_total 0.0" in metrics and "kitebus_order_buffered 0.0" in metrics


class _Lease(Fence):
    def __init__(self) -> None:
        self.state = "lapsed"
        self.renewed = asyncio.Event()
        self.waited = asyncio.Event()  # a writer waits for the renewal

    def valid(self) -> bool:
        return self.state == "valid"

    @property
    def lapsed(self) -> bool:
        return self.state == "lapsed"

    async def wait_valid(self) -> None:
        self.waited.set()
        await self.renewed.wait()


class _Socket:
    account, index = "default", 0


async def test_writes_wait_while_the_lease_is_lapsed_and_are_given_up_once_it_is_lost(rds) -> None:
    lease = _Lease()
    feed = OrderFeed(rds, KEYS, fence=lease)
    feed.start()
    try:
        feed.order(_Socket(), {"order_id": "1", "status": "OPEN"})  # type: ignore[arg-type]
        await asyncio.wait_for(lease.waited.wait(), 10)  # the feed holds the update for the lease
        assert await rds.xlen(KEYS.orders) == 0 and feed.buffered == 1  # lapsed: nothing written
        lease.state = "valid"
        lease.renewed.set()
        await eventually(lambda: feed.published == 1)
        lease.state = "lost"  # another publisher leads: it writes nothing more
        feed.order(_Socket(), {"order_id": "1", "status": "COMPLETE"})  # type: ignore[arg-type]
        await eventually(lambda: feed.given_up == 1)
        assert await rds.xlen(KEYS.orders) == 1
    finally:
        await feed.close()


async def test_a_write_whose_answer_was_lost_is_not_written_twice(rds) -> None:
    feed = OrderFeed(rds, KEYS)
    written = feed._write
    calls = 0

    async def write_then_lose_the_answer(batch: list) -> None:
        nonlocal calls
        calls += 1
        await written(batch)
        if calls == 1:
            raise RedisConnectionError("connection lost before the answer")

    feed._write = write_then_lose_the_answer  # type: ignore[method-assign]
    feed.start()
    try:
        feed.order(_Socket(), {"order_id": "1", "status": "OPEN"})  # type: ignore[arg-type]
        await eventually(lambda: feed.published == 1)
        feed.order(_Socket(), {"order_id": "1", "status": "COMPLETE"})  # type: ignore[arg-type]
        await eventually(lambda: feed.published == 2)
        assert [f[b"status"] for _, f in await rds.xrange(KEYS.orders)] == [b"OPEN", b"COMPLETE"]
        assert feed.write_errors == 1 and calls == 2  # the retry found the first in the stream
    finally:
        await feed.close()


async def _fenced_feed_writes_then_is_refused(client: Any, listener: Any, sharded: bool) -> None:
    """A feed under a real lease: its writes go through the fenced script (stream and
    channel); once another publisher holds the lease Redis refuses them, and the feed gives
    its updates up rather than write them."""
    from publisher.lease import Lease

    lease = Lease(client, KEYS)
    assert await lease.acquire()
    feed = OrderFeed(client, KEYS, fence=lease, cluster=sharded)
    pubsub = listener.pubsub()
    await pubsub.execute_command("SSUBSCRIBE" if sharded else "SUBSCRIBE", KEYS.orders)
    feed.start()
    try:
        feed.order(_Socket(), {"order_id": "1", "status": "OPEN"})  # type: ignore[arg-type]
        await eventually(lambda: feed.published == 1)
        heard = None
        async with asyncio.timeout(5):
            while heard is None:
                message = await pubsub.parse_response(block=True)
                if message[0] in (b"message", b"smessage"):
                    heard = msgpack.unpackb(message[2])
        assert heard == {"order_id": "1", "status": "OPEN", "account": "default"}
        await client.set(KEYS.leader, "999:elsewhere:1", px=3000)  # another publisher leads
        if sharded:
            await client.set(KEYS.slot_fence(_slot_tag(KEYS.orders)), "999")  # and wrote to this slot
        feed.order(_Socket(), {"order_id": "1", "status": "COMPLETE"})  # type: ignore[arg-type]
        await eventually(lambda: lease.lost.is_set() and feed.given_up == 1)
        assert [f[b"status"] for _, f in await client.xrange(KEYS.orders)] == [b"OPEN"]
    finally:
        await feed.close()
        await pubsub.aclose()


def _slot_tag(key: str) -> str:
    from redis.crc import key_slot

    from rediswire import bus

    return bus.slot_tag(key_slot(key.encode()))


async def test_under_a_lease_writes_are_fenced_and_a_deposed_leader_writes_none(redis_url) -> None:
    client = redis.from_url(redis_url)
    try:
        await _fenced_feed_writes_then_is_refused(client, client, sharded=False)
    finally:
        await client.aclose()
