"""The tick sink's bookkeeping without a socket: batches, backpressure, conflation, the cache."""

from __future__ import annotations

import asyncio

from config import Keys
from kitewire import codec
from publisher.sink import TickSink
from tests.resp import parse_commands

A, B = 1 << 8 | 1, 2 << 8 | 1


def _frame(*prices: tuple[int, float]) -> bytes:
    return codec.encode_frame(
        codec.encode_packet({"instrument_token": t, "mode": "ltp", "last_price": p}) for t, p in prices
    )



def _sink(**kwargs) -> TickSink:
    return TickSink("redis://127.0.0.1:1/0", Keys("paper"), **kwargs)


async def test_a_batch_is_the_publishes_then_one_hset_of_the_same_ticks() -> None:
    sink = _sink()
    assert sink.publish_frame(_frame((A, 1.0), (B, 2.0), (A, 3.0)), 42) == 3
    batch, (data,) = sink._take_batch()
    commands = parse_commands(data)
    assert [c[:2] for c in commands[:3]] == [[b"PUBLISH", b"paper:ticks:%d" % t] for t in (A, B, A)]
    assert commands[3][:2] == [b"HSET", b"paper:last"] and len(commands[3]) == 2 + 2 * 3
    assert (batch.replies, batch.ticks) == ([4], [3])
    assert sink.cache[A] == commands[2][2]  # the newest of A


async def test_heartbeats_and_malformed_packets_queue_nothing() -> None:
    sink = _sink()
    assert sink.publish_frame(codec.HEARTBEAT, 1) == 0
    bad = (3).to_bytes(2, "big") + (8).to_bytes(2, "big") + b"\x00\x00\x01\x01\x00\x00\x00\x05"
    assert sink.publish_frame(bad, 1) == 1
    assert sink.malformed == 2


async def test_backpressure_clears_writable_over_the_bound_and_conflation_keeps_the_newest() -> None:
    sink = _sink(max_backlog=100)
    sink.publish_frame(_frame((A, 1.0), (B, 2.0)), 1)
    assert not sink.writable.is_set() and sink.pauses == 1
    sink._conflate()  # what the overload timer does after conflate_after seconds
    assert sink.writable.is_set() and sink.conflating and sink.buffered == 0
    sink.publish_frame(_frame((A, 5.0), (A, 6.0)), 2)  # read on, given up, cached
    sink._end_conflation()
    assert sink.conflated == 4 - 2  # four ticks given up, two of them republished as newest
    _, (data,) = sink._take_batch()
    publishes = [c for c in parse_commands(data) if c[0] == b"PUBLISH"]
    assert sorted(c[2] for c in publishes) == sorted([sink.cache[A], sink.cache[B]])


async def test_released_tokens_leave_the_cache_and_are_deleted_from_the_snapshot() -> None:
    sink = _sink()
    sink.publish_frame(_frame((A, 1.0), (B, 2.0)), 1)
    sink._take_batch()
    sink.prune({A})
    assert set(sink.cache) == {A}
    _, (data,) = sink._take_batch()
    assert parse_commands(data) == [
        [b"HDEL", b"paper:last", b"%d" % B],
        [b"HDEL", b"paper:token_status", b"%d" % B],
    ]


async def test_a_token_released_before_its_first_tick_here_is_deleted_from_the_snapshot() -> None:
    """Found by the soak: just after a takeover, a token subscribed but not yet ticked (no
    cache entry) was released; the old leader's snapshot of it stayed in {ns}:last."""
    sink = _sink()
    sink.prune({A, B})  # subscribed, no tick of either yet
    sink.prune({A})  # B released
    _, (data,) = sink._take_batch()
    assert parse_commands(data) == [
        [b"HDEL", b"paper:last", b"%d" % B],
        [b"HDEL", b"paper:token_status", b"%d" % B],
    ]


async def test_a_released_tokens_hdel_waits_behind_every_queued_hset_of_it() -> None:
    """Found by the soak: with a backlog of several batches (after Redis came back), the HDEL
    went out in the first batch and an older HSET of the token re-created its snapshot."""
    sink = _sink(batch_bytes=64)
    for price in range(1, 6):
        sink.publish_frame(_frame((A, float(price)), (B, float(price))), price)  # five batches' worth
    sink.prune({B})  # A released
    commands = []
    while sink.backlog:
        commands += parse_commands(sink._take_batch()[1][0])
    hdel = next(i for i, c in enumerate(commands) if c[:2] == [b"HDEL", b"paper:last"])
    assert commands[hdel][2:] == [b"%d" % A]
    assert all(c[0] != b"HSET" for c in commands[hdel:])  # nothing re-creates A's snapshot


def _send(sink: TickSink) -> None:
    """What the writer does with the next batch, without a socket."""
    batch, data = sink._take_batch()
    sink._flight.add(batch, data)


def _live(sink: TickSink, *tokens: int):
    from publisher.live import LiveWatch

    live = LiveWatch(None, Keys("paper"), sink)  # type: ignore[arg-type]
    live.watch("1-0", "c", live.before(list(tokens)), [])
    return live, live._waiters[0]


async def test_live_means_redis_took_a_publish_of_the_token_not_that_it_was_refused() -> None:
    sink = _sink()
    live, waiter = _live(sink, A, B)
    sink.publish_frame(_frame((A, 1.0), (B, 2.0)), 1)
    _send(sink)
    sink._settle(sink._flight.read(0, b"-NOPERM no publish\r\n:1\r\n:2\r\n", careful=True))  # A refused
    assert sink.acknowledged == 2 and sink.went_out == {B}
    assert not live._progress(waiter) and waiter.live == [B]
    sink.publish_frame(_frame((A, 3.0)), 2)
    _send(sink)
    sink._settle(sink._flight.read(0, b":1\r\n:1\r\n", careful=True))
    assert live._progress(waiter) and waiter.live == [B, A]


async def test_live_does_not_count_ticks_conflated_or_lost_in_a_failed_write() -> None:
    sink = _sink(max_backlog=10)
    live, waiter = _live(sink, A)
    sink.publish_frame(_frame((A, 1.0)), 1)
    sink._conflate()  # given up
    assert sink.acknowledged == 1 and not live._progress(waiter)
    sink._end_conflation()  # A's newest republished ...
    _send(sink)
    sink._settle(sink._flight.fail_all())  # ... and lost with the socket
    assert sink.acknowledged == 2 and not live._progress(waiter)
    sink.backlog.requeue_lost(sink.queued)
    _send(sink)
    sink._settle(sink._flight.read(0, b":1\r\n:1\r\n", careful=False))
    assert live._progress(waiter) and waiter.live == [A]


async def test_ticks_handed_in_before_the_watch_do_not_count() -> None:
    sink = _sink()
    sink.publish_frame(_frame((A, 1.0)), 1)  # queued before the subscribe (an older claim of A)
    live, waiter = _live(sink, A)
    _send(sink)
    sink._settle(sink._flight.read(0, b":1\r\n:1\r\n", careful=False))
    assert not live._progress(waiter)
    sink.unwatch([A])
    assert not sink._watchers and not sink._flight.track


async def test_packets_of_unclaimed_tokens_are_counted_not_published_and_release_prunes_seq() -> None:
    claimed = {A}
    sink = _sink(claimed=claimed)
    assert sink.publish_frame(_frame((B, 1.0), (A, 2.0), (B, 3.0)), 1) == 1
    assert sink.unclaimed == 2 and set(sink.cache) == {A}
    batch, (data,) = sink._take_batch()
    commands = [c[:2] for c in parse_commands(data)]
    assert commands == [[b"PUBLISH", b"paper:ticks:%d" % A], [b"HSET", b"paper:last"]]
    assert batch.commands[0][0][1] == (A,)  # what to republish should it fail: A alone
    claimed.add(B)
    sink.publish_frame(_frame((B, 4.0)), 2)
    assert sink.unclaimed == 2 and sink._encoder.tracked() == 2
    claimed.discard(A)
    sink.prune(claimed)
    assert sink._encoder.tracked() == 1 and set(sink.cache) == {B}


async def test_no_problem_is_reported_before_the_first_try_and_one_is_after_a_failed_try() -> None:
    """The publisher logged ``degraded component=ticks reason=redis unreachable`` at every
    start, before the sink had even tried to connect."""
    sink = _sink()  # port 1: nothing listens
    assert sink.problem == ""
    sink.start()
    try:
        async with asyncio.timeout(5):
            while not sink.problem:
                await asyncio.sleep(0.01)
        assert sink.problem.startswith("cannot connect to Redis")
    finally:
        await sink.close(flush_timeout=0)
