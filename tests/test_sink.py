"""The tick sink's buffer: bounded, oldest dropped first, stale ticks dropped, all counted."""

from __future__ import annotations

import time

import msgpack

from config import Keys
from kitewire import codec
from publisher.sink import TickSink


def _frame(token: int, count: int) -> bytes:
    tick = {"instrument_token": token, "mode": "ltp", "last_price": 100.0}
    return codec.encode_frame([codec.encode_packet(tick)] * count)


def test_full_buffer_drops_the_oldest_frames_and_counts_them() -> None:
    sink = TickSink("redis://127.0.0.1:1/0", Keys(), max_buffered=10)
    now = time.time_ns()
    assert sink.publish_frame(_frame(1 << 8 | 1, 6), now) == 6
    assert sink.publish_frame(_frame(2 << 8 | 1, 6), now) == 6
    assert (sink.buffered, sink.dropped) == (6, 6)
    assert [token for token, _ in sink._take_batch()] == [2 << 8 | 1] * 6


def test_stale_ticks_are_dropped_when_their_turn_comes() -> None:
    sink = TickSink("redis://127.0.0.1:1/0", Keys(), stale_after=1.0)
    sink.publish_frame(_frame(1 << 8 | 1, 3), time.time_ns() - 2_000_000_000)
    sink.publish_frame(_frame(2 << 8 | 1, 2), time.time_ns())
    batch = sink._take_batch()
    assert [token for token, _ in batch] == [2 << 8 | 1] * 2
    assert (sink.dropped, sink.buffered) == (3, 0)


def test_malformed_packets_are_counted_and_heartbeats_ignored() -> None:
    sink = TickSink("redis://127.0.0.1:1/0", Keys())
    assert sink.publish_frame(codec.HEARTBEAT, 1) == 0
    bad = (3).to_bytes(2, "big") + (8).to_bytes(2, "big") + b"\x00\x00\x01\x01\x00\x00\x00\x05"
    assert sink.publish_frame(bad, time.time_ns()) == 1
    assert sink.malformed == 2


def test_encoded_commands_are_one_publish_per_tick_and_one_hset() -> None:
    sink = TickSink("redis://127.0.0.1:1/0", Keys("paper"))
    payloads, _ = codec.frame_payloads(_frame(7 << 8 | 1, 3), 42)
    commands, replies = sink._encode(payloads)
    assert replies == 4
    assert commands.count(b"PUBLISH") == 3 and commands.count(b"HSET") == 1
    assert b"paper:ticks:1793\r\n" in commands and b"paper:last" in commands
    assert commands.endswith(payloads[-1][1] + b"\r\n")
    assert msgpack.unpackb(payloads[0][1])["received_at_ns"] == 42
