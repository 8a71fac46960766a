"""The subscriber's gap and duplicate rules and its batches, without Redis."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
from collections import deque

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.subscriber import TickSubscriber, gc_paused
from kitewire import codec


def _tick(seq: int, at: int, epoch: int = 5) -> dict:
    return {"instrument_token": 7, "seq": seq, "epoch": epoch, "received_at_ns": at}


def test_seq_starting_again_after_a_release_is_neither_a_gap_nor_a_duplicate() -> None:
    sub = TickSubscriber("redis://127.0.0.1:1/0")
    assert [sub._accept(_tick(s, s)) for s in (1, 2, 3)] == [True] * 3
    assert not sub._accept(_tick(3, 3))  # the same tick again (the snapshot)
    assert sub._accept(_tick(1, 10))  # released, claimed again: seq starts at 1
    assert not sub._accept(_tick(1, 10))  # and its snapshot twin is a duplicate
    assert sub._accept(_tick(2, 11)) and sub.missed == 0 and not sub.gaps
    assert not sub._accept(_tick(1, 9))  # an older seq 1 is no restart
    assert sub._accept(_tick(4, 12)) and sub.gaps == {7: 1}  # a real gap still counts


def test_a_claim_again_whose_first_ticks_were_lost_is_told_by_time_not_dropped() -> None:
    """Ticks 1 and 2 of the new claim never came (Redis away): tick 3 is newer than the
    last one seen, so it is delivered and the two count as missed, not taken for repeats."""
    sub = TickSubscriber("redis://127.0.0.1:1/0")
    assert all(sub._accept(_tick(s, s)) for s in range(1, 51))
    assert sub._accept(_tick(3, 100)) and sub.missed == 2 and sub.gaps == {7: 2}
    assert sub._accept(_tick(4, 101)) and sub.missed == 2
    assert not sub._accept(_tick(3, 100))  # republished: the same tick again


# --- batch(): the same ticks, gaps and status as taking one message at a time ---------------

STATUS = b"kite:stream_status"


class ScriptedPubSub:
    """What ``batch`` reads: the messages in the chunks a pub/sub read hands over."""

    def __init__(self, chunks: list[list[tuple[bytes, bytes]]]) -> None:
        self.chunks = deque(chunks)

    async def read(self, timeout: float) -> list[tuple[bytes, bytes]]:
        return self.chunks.popleft() if self.chunks else []


async def _one_at_a_time(sub: TickSubscriber, limit: int) -> list[dict]:
    """The loop ``batch`` had before the fast path: a message, its status or its tick, then the next."""
    out: list[dict] = []
    while len(out) < limit:
        if not sub._unread:
            sub._unread.extend(await sub._read(0.0))
            if not sub._unread:
                break
        channel, data = sub._unread.popleft()
        if sub._is_status(channel, data):
            continue
        tick = msgpack.unpackb(data)
        if sub._accept(tick):
            out.append(tick)
    return out


@st.composite
def _messages(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Ticks of three tokens with gaps, repeats, restarts and older ticks (as the publisher
    writes them, and some without seq as an older one did), and stream status among them."""
    out = []
    for _ in range(draw(st.integers(0, 60))):
        token = draw(st.sampled_from([1 << 8 | 1, 2 << 8 | 1, 3 << 8 | 9]))
        if draw(st.integers(0, 9)) == 0:
            event = {"status": draw(st.sampled_from(["live", "stale"])), "tokens": [token, 99],
                     "connection": draw(st.integers(0, 2)), "reason": "r"}  # fmt: skip
            out.append((STATUS, msgpack.packb(event)))
            continue
        seq, epoch, at = draw(st.integers(1, 12)), draw(st.integers(1, 2)), draw(st.integers(1, 40))
        packet = codec.encode_packet({"instrument_token": token, "mode": "ltp", "last_price": 1.5})
        if draw(st.integers(0, 5)) == 0:
            payload = msgpack.packb({"instrument_token": token, "mode": "ltp", "received_at_ns": at})
        else:
            payload = codec.PAYLOAD_WRITERS[len(packet)].write(packet, 0, at, seq, epoch)[1]
        out.append((b"kite:ticks:%d" % token, payload))
    return out


def _subscriber(chunks: list[list[tuple[bytes, bytes]]], events: list) -> TickSubscriber:
    sub = TickSubscriber("redis://127.0.0.1:1/0", on_status=events.append)
    sub._pubsub = ScriptedPubSub(chunks)
    sub.listened = {1 << 8 | 1, 2 << 8 | 1, 3 << 8 | 9}
    sub._listening.set()
    return sub


@settings(deadline=None)
@given(_messages(), st.lists(st.integers(0, 60)), st.lists(st.integers(1, 8), min_size=1))
def test_batch_takes_exactly_what_one_message_at_a_time_took(messages, cuts, limits) -> None:
    bounds = [0, *sorted(c for c in cuts if c < len(messages)), len(messages)]
    chunks = [messages[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    async def run() -> None:
        events_new: list = []
        events_old: list = []
        new, old = _subscriber(list(chunks), events_new), _subscriber(list(chunks), events_old)
        for call in itertools.count():
            limit = limits[call % len(limits)]
            got, expected = await new.batch(limit, wait=0.0), await _one_at_a_time(old, limit)
            assert got == expected
            assert (new.gaps, new.missed, new.status) == (old.gaps, old.missed, old.status)
            assert events_new == events_old
            assert list(new._unread) == list(old._unread)
            if not got and not new._unread and not new._pubsub.chunks:
                break

    asyncio.run(run())


def test_batch_leaves_the_garbage_collector_as_it_found_it() -> None:
    packet = codec.encode_packet({"instrument_token": 1 << 8 | 1, "mode": "ltp", "last_price": 1.5})
    ticks = [(b"kite:ticks:257", codec.PAYLOAD_WRITERS[8].write(packet, 0, s, s, 1)[1]) for s in (1, 2, 3)]
    stale = (STATUS, msgpack.packb({"status": "stale", "tokens": [257], "connection": 0, "reason": "r"}))
    collector: list[bool] = []

    async def run() -> None:
        sub = _subscriber([[ticks[0], stale, ticks[1]]], [])
        sub.on_status = lambda event: collector.append(gc.isenabled())
        assert len(await sub.batch(wait=0.0)) == 2 and gc.isenabled()
        sub._pubsub.chunks.append([ticks[2]])
        gc.disable()
        try:
            assert len(await sub.batch(wait=0.0)) == 1 and not gc.isenabled()
        finally:
            gc.enable()

    asyncio.run(run())
    assert collector == [False]  # on_status ran inside a batch: the collector paused


def test_overlapping_batches_in_two_threads_keep_the_collector_off_until_both_are_done() -> None:
    """Two BlockingTickSubscribers build batches in their own threads: the collector stays
    off while either is inside one, and is on again once both are done."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with gc_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with gc_paused():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.isenabled())  # the first's batch ended, this one goes on

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert seen == [False] and gc.isenabled()
