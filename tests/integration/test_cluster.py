"""kitebus on a real 3-master Redis Cluster: sharded pub/sub, the contract's keys, resharding
and a lost master."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis
from redis.crc import key_slot

from config import Keys, Settings, load_settings
from config.keys import CONTROL_GROUP
from consumers.control import ControlClient
from consumers.subscriber import TickSubscriber
from kitebus.localredis import LocalCluster
from publisher.app import Publisher
from publisher.control import CONSUMER
from publisher.lease import Lease
from rediswire import bus
from simulator.server import TickerServer
from tests.integration.conftest import FAST, eventually
from tests.integration.test_cli import kitebus
from tests.integration.test_fence import StubFence

KEYS = Keys("kite")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    running = LocalCluster(3)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def cluster_settings(cluster: LocalCluster, simulator: TickerServer) -> Settings:
    return load_settings(
        kite_ws_url=simulator.url, redis_url=cluster.url, redis_cluster=True, kite_api_key="kitebus",
        kite_access_token="simulator", namespace="kite",
    )  # fmt: skip


@pytest.fixture
async def crds(cluster: LocalCluster) -> AsyncIterator[bus.Client]:
    client = bus.connect(cluster.url, True)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_publisher(cluster_settings: Settings) -> AsyncIterator[Publisher]:
    running = Publisher(cluster_settings, FAST)
    await running.start()
    await eventually(lambda: all(c.state == "live" for c in running.connections))
    yield running
    await running.stop()


def tokens_on_every_node(cluster: LocalCluster, per_node: int = 2) -> list[int]:
    """Instrument tokens whose tick channels sit on each of the cluster's masters."""
    found: dict[int, list[int]] = {}
    token = 256265
    while any(len(found.get(i, [])) < per_node for i in range(len(cluster.nodes))):
        node = cluster.owner(key_slot(KEYS.ticks(token).encode()))
        if len(found.setdefault(node, [])) < per_node:
            found[node].append(token)
        token += 256
    return sorted(t for tokens in found.values() for t in tokens)


async def ticks_of(sub: TickSubscriber, wanted: set[int], timeout: float = 10.0) -> set[int]:
    """Read until every wanted token ticked (fails after ``timeout``)."""
    seen: set[int] = set()
    async with asyncio.timeout(timeout):
        async for tick in sub:
            seen.add(tick["instrument_token"])
            if wanted <= seen:
                return seen
    return seen


async def plain_subscribers_hear(
    cluster: LocalCluster, tokens: list[int], publisher: Publisher, sub: TickSubscriber
) -> tuple[list[dict], int]:
    """Messages a plain SUBSCRIBE to the tokens' channels on every node heard while the
    publisher had at least 3 ticks of each token acknowledged by Redis, and how many it had."""
    clients = [redis.from_url(node.url) for node in cluster.nodes]
    pubsubs = [client.pubsub() for client in clients]
    heard: list[dict] = []
    try:
        for pubsub in pubsubs:
            await pubsub.subscribe(*(KEYS.ticks(t) for t in tokens))
            confirmed = 0
            while confirmed < len(tokens):  # subscribed for sure before the count starts
                message = await pubsub.get_message(timeout=5)
                assert message is not None, "no SUBSCRIBE confirmation"
                confirmed += message["type"] == "subscribe"
        start = publisher.sink.published
        await eventually(lambda: publisher.sink.published >= start + 3 * len(tokens), timeout=10)
        flowed = publisher.sink.published - start
        await ticks_of(sub, set(tokens))  # and the sharded subscriber still hears them
        for pubsub in pubsubs:
            await pubsub.ping()  # answered after whatever was published to it before
            while (message := await pubsub.get_message(timeout=5)) and message["type"] != "pong":
                heard.append(message)
    finally:
        for pubsub, client in zip(pubsubs, clients, strict=True):
            await pubsub.aclose()
            await client.aclose()
    return heard, flowed


async def test_ticks_go_out_sharded_to_every_master_and_keys_keep_their_names(
    cluster, cluster_publisher, crds
) -> None:
    tokens = tokens_on_every_node(cluster)
    async with TickSubscriber(crds, client="strat") as sub:
        result = await sub.subscribe(tokens, mode="quote")
        assert result.ok and sorted(result.applied) == tokens
        assert await ticks_of(sub, set(tokens)) >= set(tokens)
        # the ticks go out with SPUBLISH: while they flow, a plain SUBSCRIBE on any node hears none
        heard, flowed = await plain_subscribers_hear(cluster, tokens, cluster_publisher, sub)
        assert flowed >= 3 * len(tokens) and heard == []
        assert sub.gaps == {} and sub.reconnects == 0
    # one socket per master, each carrying the ticks of its channels
    assert cluster_publisher.sink.nodes == 3 and cluster_publisher.sink.redirects == 0
    # the contract's keys, under their own names, spread over the slots
    assert {int(t) for t in await crds.hkeys(KEYS.token_conn)} == set()  # released on exit
    assert await crds.exists(KEYS.status) and await crds.exists(KEYS.conn(0))


async def test_kites_heartbeats_pass_through_the_cluster_sink(cluster_publisher, simulator) -> None:
    """A 1-byte heartbeat, dealt out by node, is a part with no packet and no channel: it
    must not end the connection."""
    simulator.paused = True  # the market holds still: heartbeats only, every 0.2 s
    connections = cluster_publisher.connections
    reconnects = [c.reconnects for c in connections]
    since = time.time()
    await eventually(lambda: all(c.last_message_at > since + 0.5 for c in connections))
    assert [c.reconnects for c in connections] == reconnects
    assert all(c.state == "live" and c.last_error == "" for c in connections)


async def test_snapshot_claims_and_ops_commands_work_unchanged(cluster, cluster_publisher, crds) -> None:
    tokens = tokens_on_every_node(cluster, 1)
    control = ControlClient(crds, "kite")
    await control.subscribe(tokens, mode="full", client="desk")
    await eventually(lambda: crds.hlen(KEYS.last), timeout=10)
    assert {int(t) for t in await crds.hkeys(KEYS.token_conn)} == set(tokens)
    assert await crds.hgetall(KEYS.claims("desk")) == {str(t).encode(): b"full" for t in tokens}
    env = {"KITEBUS_REDIS_CLUSTER": "1"}
    code, out, err = await kitebus(cluster.url, "status", **env)
    assert code == 0, err
    code, out, _ = await kitebus(cluster.url, "ctl", "subscribe", str(tokens[0]), "--mode", "ltp", **env)
    assert code == 0 and out.startswith("ok: subscribe client=ops applied=1")
    code, out, _ = await kitebus(cluster.url, "tail", str(tokens[0]), "--count", "2", **env)
    assert code == 0 and len(out.splitlines()) == 2  # the snapshot, then a live tick, over SSUBSCRIBE
    async with TickSubscriber(crds, client="late") as late:  # a late joiner gets the snapshot at once
        await late.listen(tokens)
        first = await late.batch(wait=5)  # snapshot ticks come first, all at once
        assert {t["instrument_token"] for t in first[: len(tokens)]} == set(tokens)


async def test_a_resharded_slot_is_followed_by_the_sink_the_library_and_the_control_loop(
    cluster, cluster_publisher, crds
) -> None:
    tokens = tokens_on_every_node(cluster, 1)
    moving = tokens[0]
    async with TickSubscriber(crds, client="strat") as sub:
        await sub.subscribe(tokens, mode="ltp")
        await ticks_of(sub, set(tokens))
        slot = key_slot(KEYS.ticks(moving).encode())
        to = (cluster.owner(slot) + 1) % 3
        await asyncio.to_thread(cluster.move_slot, slot, to)
        for key in (KEYS.control, KEYS.last):  # the control stream and the snapshots move too
            key_to = (cluster.owner(key_slot(key.encode())) + 1) % 3
            await asyncio.to_thread(cluster.move_slot, key_slot(key.encode()), key_to)
        assert cluster.owner(slot) == to
        # ticks of the moved channel reach the subscriber again, from its new master
        await eventually(lambda: cluster_publisher.sink.redirects >= 1, timeout=10)
        assert await ticks_of(sub, {moving}) >= {moving}
        assert sub.reconnects >= 1  # Redis unsubscribed the moved channel: the library came back
        # the control stream, now on another master, still answers
        result = await sub.subscribe([tokens[1]], mode="full")
        assert result.ok
    assert cluster_publisher.sink.write_errors >= 1  # the redirects were counted, and shown

    async def shown() -> bool:
        return int(await crds.hget(KEYS.status, "redis_redirects") or 0) >= 1

    await eventually(shown)


async def test_a_lost_master_loses_no_claim_and_no_request(cluster, cluster_publisher, crds) -> None:
    tokens = tokens_on_every_node(cluster, 1)
    control = ControlClient(crds, "kite")
    assert (await control.subscribe(tokens, mode="quote", client="desk")).ok
    victim = cluster.owner(key_slot(KEYS.claims("desk").encode()))
    reconnects = cluster_publisher.sink.redis_reconnects
    await asyncio.to_thread(cluster.nodes[victim].stop)  # its data is gone with it (no persistence)
    await asyncio.to_thread(cluster.nodes[victim].start)
    await asyncio.to_thread(cluster.wait_ok, 30)
    # the publisher noticed, and wrote back every claim and hash from its book
    await eventually(lambda: crds.hlen(KEYS.claims("desk")), timeout=20)
    assert await crds.hgetall(KEYS.claims("desk")) == {str(t).encode(): b"quote" for t in tokens}
    assert {int(t) for t in await crds.hkeys(KEYS.token_conn)} == set(tokens)
    assert cluster_publisher.sink.redis_reconnects > reconnects
    # requests are answered again, each exactly once, and ticks flow on every master
    async with TickSubscriber(crds, client="after") as sub:
        result = await sub.subscribe(tokens, mode="ltp")
        assert result.ok and sorted(result.applied) == tokens
        assert await ticks_of(sub, set(tokens), timeout=15) >= set(tokens)
    answers = [(f[b"request"], f[b"op"]) for _, f in await crds.xrange(KEYS.control_results)]
    assert answers and len(answers) == len(set(answers))


async def test_a_pending_request_already_answered_is_acknowledged_not_answered_again(
    cluster_settings, crds
) -> None:
    """On a cluster a result and its XACK go to different nodes: a publisher that stopped
    between the two leaves the request pending with its result in. The next one must not
    answer it again (its client would read two results)."""
    await crds.xgroup_create(KEYS.control, CONTROL_GROUP, id="0", mkstream=True)
    entry = await crds.xadd(KEYS.control, _request("408065", "a"))
    fresh = await crds.xadd(KEYS.control, _request("884737", "b"))
    await crds.xreadgroup(CONTROL_GROUP, CONSUMER, {KEYS.control: ">"}, count=1)  # entry: pending
    await crds.hset(KEYS.claims("a"), "408065", "ltp")  # what that publisher had written
    await crds.sadd(KEYS.clients, "a")
    await crds.xadd(KEYS.control_results, {"request": entry, "op": "subscribe", "client": "a", "ok": "1"})
    running = Publisher(cluster_settings, FAST)
    await running.start()
    try:

        async def drained() -> bool:
            return (await crds.xpending(KEYS.control, CONTROL_GROUP))["pending"] == 0 and any(
                f[b"request"] == fresh for _, f in await crds.xrange(KEYS.control_results)
            )

        await eventually(drained)
        results = await crds.xrange(KEYS.control_results)
        answers = [f[b"request"] for _, f in results if f[b"op"] == b"subscribe"]
        assert answers.count(entry) == 1 and answers.count(fresh) == 1
        assert running.book.in_force == {408065: "ltp", 884737: "ltp"}  # its claim still holds
    finally:
        await running.stop()


async def test_a_slot_a_newer_fence_wrote_to_refuses_the_older_ones_writes(crds) -> None:
    """A script reaches one slot: each slot keeps the highest fence that wrote to it, and a
    lower one's part of a batch is refused; where no newer fence wrote yet, it lands."""
    old, new = StubFence("5:old:1", 5), StubFence("6:new:2", 6)
    start = bus.OrderedWrites(crds, 1, new)  # what a new leader's start does
    start.stages[0].stamp(KEYS.control, KEYS.control_results)
    start.stages[0].hset(KEYS.token_conn, "1", "0")
    await start.execute()
    untouched = next(f"c{n}" for n in range(100) if key_slot(KEYS.claims(f"c{n}").encode()) not in
                     {key_slot(k.encode()) for k in (KEYS.control, KEYS.control_results, KEYS.token_conn)})
    batch = bus.OrderedWrites(crds, 3, old)
    batch.stages[0].hset(KEYS.claims(untouched), "2", "ltp")
    batch.stages[0].hset(KEYS.token_conn, "2", "0")
    batch.stages[1].xadd(KEYS.control_results, {"request": "1-1"})
    batch.stages[2].xack(KEYS.control, CONTROL_GROUP, "1-1")
    with pytest.raises(bus.Deposed, match="DEPOSED 6 wrote to this slot after our fence 5"):
        await batch.execute()
    assert [seen for _, seen in old.deposed] == [6]
    assert await crds.hgetall(KEYS.token_conn) == {b"1": b"0"}  # refused
    assert await crds.xlen(KEYS.control_results) == 0  # the later stages were never sent
    assert await crds.hgetall(KEYS.claims(untouched)) == {b"2": b"ltp"}  # the documented limit
    again = bus.OrderedWrites(crds, 1, new)
    again.stages[0].hset(KEYS.token_conn, "3", "0")
    await again.execute()  # the newer fence writes on
    assert await crds.hget(KEYS.token_conn, "3") == b"0" and not new.deposed


async def test_a_leader_on_a_cluster_serves_with_fenced_writes_until_a_newer_fence_wrote(
    cluster_settings, crds
) -> None:
    lease = Lease(crds, KEYS)
    assert await lease.acquire()
    leader = Publisher(cluster_settings, FAST, lease=lease)
    lease.start(leader.health)
    try:
        await leader.start()
        control = ControlClient(crds, "kite")
        assert (await control.subscribe([408065], mode="ltp", client="a", timeout=10)).ok
        assert await crds.hgetall(KEYS.claims("a")) == {b"408065": b"ltp"}
        control_fence = KEYS.slot_fence(bus.slot_tag(key_slot(KEYS.control.encode())))
        assert int(await crds.get(control_fence)) == lease.fence  # claimed at start
        # a newer leader's start claims the slots of the control stream and its results
        newer = bus.OrderedWrites(crds, 1, StubFence("99:new:2", lease.fence + 1))
        newer.stages[0].stamp(KEYS.control, KEYS.control_results)
        await newer.execute()
        request = await crds.xadd(KEYS.control, _request("884737", "a"))
        await eventually(lambda: lease.lost.is_set(), timeout=10)
        assert request not in [f[b"request"] for _, f in await crds.xrange(KEYS.control_results)]
        assert (await crds.xpending(KEYS.control, CONTROL_GROUP))["pending"] == 1  # never acknowledged
    finally:
        await leader.stop()
        await lease.close(release=not lease.lost.is_set())


def _request(tokens: str, client: str) -> dict[str, str]:
    return {"op": "subscribe", "tokens": tokens, "mode": "ltp", "client": client}


async def test_order_updates_go_to_the_stream_and_out_sharded_on_a_cluster(
    cluster, cluster_publisher, crds, simulator
) -> None:
    import msgpack

    node = cluster.nodes[cluster.owner(key_slot(KEYS.orders.encode()))]  # the stream's and the channel's
    listener = redis.from_url(node.url)
    pubsub = listener.pubsub()
    await pubsub.execute_command("SSUBSCRIBE", KEYS.orders)
    async with TickSubscriber(crds, client="strat") as sub:
        reader = sub.order_updates()
        await reader.start()
        placed = await simulator.order("place", tradingsymbol="SBIN", quantity=2, price=960.0)
        filled = await simulator.order("fill", order_id=placed["order_id"])
        got = [await reader.next(10) for _ in range(2)]
    assert [u.data for u in got] == [placed, filled]  # type: ignore[union-attr]
    assert [f[b"status"] for _, f in await crds.xrange(KEYS.orders)] == [b"OPEN", b"COMPLETE"]
    heard: list[dict] = []
    async with asyncio.timeout(10):
        while len(heard) < 2:
            message = await pubsub.parse_response(block=True)
            if message[0] == b"smessage":
                heard.append(msgpack.unpackb(message[2]))
    assert heard == [{**placed, "account": "default"}, {**filled, "account": "default"}]
    await pubsub.aclose()
    await listener.aclose()


async def test_order_writes_are_fenced_per_slot_on_a_cluster(cluster, crds) -> None:
    from tests.integration.test_orders import _fenced_feed_writes_then_is_refused

    node = cluster.nodes[cluster.owner(key_slot(KEYS.orders.encode()))]
    listener = redis.from_url(node.url)
    try:
        await _fenced_feed_writes_then_is_refused(crds, listener, sharded=True)
    finally:
        await listener.aclose()
