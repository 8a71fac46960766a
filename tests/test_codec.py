"""The codec against its own encoder, against Kite's official parser, and against bad input."""

from __future__ import annotations

from datetime import datetime

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kiteconnect import KiteTicker

from kitewire import codec
from tests.strategies import ticks

OFFICIAL = KiteTicker("oracle", "oracle")


def _epoch(value: object) -> object:
    return int(value.timestamp()) if isinstance(value, datetime) else value


def _official(frame: bytes) -> list[dict]:
    """The official client's parse, with its datetimes turned back into epoch seconds."""
    parsed = OFFICIAL._parse_binary(frame)
    return [{key: _epoch(value) for key, value in tick.items()} for tick in parsed]


@given(st.lists(ticks(), min_size=1, max_size=20))
def test_encode_then_decode_gives_the_same_ticks(batch: list[dict]) -> None:
    frame = codec.encode_frame(codec.encode_packet(tick) for tick in batch)
    decoded, malformed = codec.decode_frame(frame)
    assert malformed == 0
    assert decoded == batch


@settings(max_examples=300)
@given(st.lists(ticks(), min_size=1, max_size=10))
def test_decode_agrees_with_the_official_client_on_every_field(batch: list[dict]) -> None:
    frame = codec.encode_frame(codec.encode_packet(tick) for tick in batch)
    decoded, _ = codec.decode_frame(frame)
    assert decoded == _official(frame)


@given(st.lists(ticks(), min_size=1, max_size=10), st.integers(0, 2**63), st.integers(0, 2**63))
def test_payloads_are_the_decoded_ticks_plus_receive_time_seq_and_epoch(
    batch: list[dict], now: int, epoch: int
) -> None:
    frame = codec.encode_frame(codec.encode_packet(tick) for tick in batch)
    packets, malformed = codec.scan_frame(frame)
    assert malformed == 0
    written = [
        codec.PAYLOAD_WRITERS[layout.length].write(frame, offset, now, seq, epoch)
        for seq, (layout, offset) in enumerate(packets, 1)
    ]
    assert [token for token, _ in written] == [tick["instrument_token"] for tick in batch]
    assert [msgpack.unpackb(body) for _, body in written] == [
        tick | {"received_at_ns": now, "seq": seq, "epoch": epoch} for seq, tick in enumerate(batch, 1)
    ]


@pytest.mark.parametrize(
    ("token", "raw", "price"),
    [
        (408065, 123456, 1234.56),  # nse: paise
        (256265, 2400050, 24000.50),  # indices
        (2 << 8 | 3, 834512345, 83.4512345),  # cds: 1e7
        (7 << 8 | 6, 834512, 83.4512),  # bcd: 1e4
        (9 << 8 | 12, 51234, 5.1234),  # nco: 1e4
        (5 << 8 | 7, 612300, 6123.00),  # mcx
    ],
)
def test_segment_divisors(token: int, raw: int, price: float) -> None:
    packet = token.to_bytes(4, "big") + raw.to_bytes(4, "big")
    (tick,), _ = codec.decode_frame(codec.encode_frame([packet]))
    assert tick["last_price"] == pytest.approx(price, rel=1e-12)
    assert tick["tradable"] is (token & 0xFF != 9)


def test_index_packet_reads_high_low_open_close_in_that_order() -> None:
    values = [256265, 100, 400, 150, 200, 300, 0, 1764330000]  # token, ltp, h, l, o, c, chg, ts
    packet = b"".join(v.to_bytes(4, "big") for v in values)
    (tick,), _ = codec.decode_frame(codec.encode_frame([packet]))
    assert tick["ohlc"] == {"high": 4.0, "low": 1.5, "open": 2.0, "close": 3.0}
    assert tick["exchange_timestamp"] == 1764330000
    assert tick["mode"] == "full" and tick["tradable"] is False


def test_heartbeat_and_empty_frames_yield_nothing() -> None:
    for frame in (b"", codec.HEARTBEAT, b"\x00\x00"):
        assert codec.decode_frame(frame) == ([], 0)
        assert codec.scan_frame(frame) == ([], 0)


@given(st.lists(ticks(), min_size=1, max_size=5), st.data())
def test_truncation_at_any_byte_keeps_whole_packets_and_counts_the_rest(batch, data) -> None:
    packets = [codec.encode_packet(tick) for tick in batch]
    frame = codec.encode_frame(packets)
    cut = data.draw(st.integers(2, len(frame) - 1))
    decoded, malformed = codec.decode_frame(frame[:cut])
    ends, pos = [], 2
    for packet in packets:
        pos += 2 + len(packet)
        ends.append(pos)
    whole = sum(end <= cut for end in ends)
    assert decoded == batch[:whole]
    assert malformed == len(batch) - whole
    assert codec.scan_frame(frame[:cut])[1] == malformed


def test_every_truncation_of_a_full_frame_is_handled() -> None:
    frame = codec.encode_frame([codec.encode_packet(_full_tick())] * 3)
    for cut in range(len(frame)):
        decoded, malformed = codec.decode_frame(frame[:cut])
        assert len(decoded) + malformed == (3 if cut >= 2 else 0)


def test_unknown_packet_length_is_skipped_and_neighbours_kept() -> None:
    good = codec.encode_packet(_full_tick())
    frame = codec.encode_frame([good, b"\x01" * 13, good])
    decoded, malformed = codec.decode_frame(frame)
    assert malformed == 1
    assert [t["instrument_token"] for t in decoded] == [408065, 408065]


def test_count_larger_than_the_frame_is_counted_not_raised() -> None:
    good = codec.encode_packet(_full_tick())
    frame = (500).to_bytes(2, "big") + codec.encode_frame([good])[2:]
    decoded, malformed = codec.decode_frame(frame)
    assert len(decoded) == 1 and malformed == 499


def test_length_larger_than_the_frame_is_counted() -> None:
    frame = (1).to_bytes(2, "big") + (184).to_bytes(2, "big") + b"\x00" * 20
    assert codec.decode_frame(frame) == ([], 1)


def test_encode_rejects_values_that_do_not_fit() -> None:
    tick = _full_tick() | {"volume_traded": 2**32}
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode_packet(tick)
    with pytest.raises(ValueError, match="unknown mode"):
        codec.encode_packet(tick | {"mode": "deep"})


def _full_tick() -> dict:
    return {
        "instrument_token": 408065, "mode": "full", "tradable": True, "last_price": 1234.5,
        "last_traded_quantity": 3, "average_traded_price": 1230.25, "volume_traded": 1000,
        "total_buy_quantity": 5, "total_sell_quantity": 6,
        "ohlc": {"open": 1200.0, "high": 1250.0, "low": 1190.0, "close": 1210.0},
        "last_trade_time": 1764330000, "oi": 0, "oi_day_high": 0, "oi_day_low": 0,
        "exchange_timestamp": 1764330001,
        "depth": {
            side: [{"quantity": i + 1, "price": 1234.0 + i, "orders": i} for i in range(5)]
            for side in ("buy", "sell")
        },
    }  # fmt: skip


@given(st.lists(ticks(), max_size=8), st.integers(1, 4), st.data())
def test_split_frame_deals_packets_to_their_lanes_and_keeps_what_the_decoder_sees(batch, lanes, data) -> None:
    frame = codec.encode_frame([*(codec.encode_packet(t) for t in batch), b"\x07" * 13])  # one unknown
    frame = frame[: data.draw(st.integers(0, len(frame)))]  # a cut-short end too
    parts = codec.split_frame(frame, lambda token: token % lanes, lanes)
    assert len(parts) == lanes
    decoded, malformed = codec.decode_frame(frame)
    split = [codec.decode_frame(part) if part else ([], 0) for part in parts]
    for lane, (part_ticks, _) in enumerate(split):
        assert all(t["instrument_token"] % lanes == lane for t in part_ticks)
        if part_ticks:  # a part begins with a known packet: its token routes the part
            assert int.from_bytes(parts[lane][4:8], "big") == part_ticks[0]["instrument_token"]
    assert sum(m for _, m in split) == malformed
    for lane in range(lanes):  # order kept within each lane
        assert split[lane][0] == [t for t in decoded if t["instrument_token"] % lanes == lane]
