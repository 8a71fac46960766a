"""A rebalance's moves on the hot path: dropping packets, and one publishing connection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kitewire import codec
from publisher.moves import Moves
from tests.strategies import ticks

A, B = 408065, 2953217


def _quote(token: int, volume: int) -> bytes:
    tick = {
        "instrument_token": token, "mode": "quote", "last_price": 100.0, "volume_traded": volume,
        "last_traded_quantity": 1, "average_traded_price": 100.0, "total_buy_quantity": 0,
        "total_sell_quantity": 0, "ohlc": {"open": 99.0, "high": 101.0, "low": 98.0, "close": 99.5},
    }  # fmt: skip
    return codec.encode_packet(tick)


def _ltp(token: int, price: float) -> bytes:
    return codec.encode_packet({"instrument_token": token, "mode": "ltp", "last_price": price})


@given(st.lists(ticks(), max_size=6), st.data())
def test_drop_packets_keeps_every_other_byte_and_what_the_decoder_sees(batch, data) -> None:
    packets = [codec.encode_packet(t) for t in batch]
    frame = codec.encode_frame([*packets, b"\x07" * 13])  # an unknown packet stays too
    frame = frame[: data.draw(st.integers(0, len(frame)))]  # and so does a cut-short end
    gone = set(data.draw(st.lists(st.sampled_from([t["instrument_token"] for t in batch] or [1]))))
    kept = codec.drop_packets(frame, lambda token, body: token in gone)
    decoded, malformed = codec.decode_frame(frame)
    decoded_kept, malformed_kept = codec.decode_frame(kept)
    assert decoded_kept == [t for t in decoded if t["instrument_token"] not in gone]
    assert malformed_kept == malformed
    if not any(t["instrument_token"] in gone for t in decoded):
        assert kept is frame


def _handlers(moves: Moves) -> tuple[list[bytes], list]:
    out: list[bytes] = []

    def publish(frame: bytes, _: int) -> int:
        out.extend(codec.frame_tokens(frame) and [frame])
        return 0

    return out, [moves.handler(i, publish) for i in range(3)]


def _published(out: list[bytes]) -> list[tuple[int, int]]:
    ticks = [t for frame in out for t in codec.decode_frame(frame)[0]]
    return [(t["instrument_token"], t.get("volume_traded", -1)) for t in ticks]


def test_one_connection_publishes_a_moving_token_at_any_time() -> None:
    moves = Moves()
    out, (src, dst, _) = _handlers(moves)
    moves.begin(A, 0, 1, "quote")
    src(codec.encode_frame([_quote(A, 1), _quote(B, 1)]), 0)
    dst(codec.encode_frame([_ltp(A, 100.0)]), 0)  # not the mode in force: not dst's first
    src(codec.encode_frame([_quote(A, 2)]), 0)
    assert moves.owner(A) == 0
    dst(codec.encode_frame([_quote(A, 2), _quote(B, 9)]), 0)  # the same tick as src's last
    assert moves.owner(A) == 1 and moves.take_switched() == {A}
    src(codec.encode_frame([_quote(A, 3)]), 0)  # src after the switch: dropped
    dst(codec.encode_frame([_quote(A, 3)]), 0)
    assert _published(out) == [(A, 1), (B, 1), (A, 2), (B, 9), (A, 3)]


def test_dst_first_packet_is_published_when_it_is_news() -> None:
    moves = Moves()
    out, (src, dst, _) = _handlers(moves)
    moves.begin(A, 0, 1, "quote")
    src(codec.encode_frame([_quote(A, 1)]), 0)
    dst(codec.encode_frame([_quote(A, 5)]), 0)
    assert _published(out) == [(A, 1), (A, 5)]


def test_a_forgotten_move_publishes_from_every_connection_again() -> None:
    moves = Moves()
    out, (src, _, other) = _handlers(moves)
    moves.begin(A, 0, 1, "quote")
    other(codec.encode_frame([_quote(A, 7)]), 0)  # a connection outside the move is not muted
    moves.switch(A)
    src(codec.encode_frame([_quote(A, 8)]), 0)
    moves.forget([A])
    assert not moves
    src(codec.encode_frame([_quote(A, 9)]), 0)
    assert _published(out) == [(A, 7), (A, 9)]


def test_a_mode_change_mid_move_is_what_dst_must_deliver() -> None:
    moves = Moves()
    _, (_, dst, _) = _handlers(moves)
    moves.begin(A, 0, 1, "quote")
    moves.set_mode(A, "ltp")
    dst(codec.encode_frame([_quote(A, 1)]), 0)
    assert moves.owner(A) == 0
    dst(codec.encode_frame([_ltp(A, 101.0)]), 0)
    assert moves.owner(A) == 1
