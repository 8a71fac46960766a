"""consumers.bars.BarBuilder: a scripted tick sequence against bars computed by hand."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from consumers.bars import BarBuilder, bar_start, bars_key, exchange_of

IST = timezone(timedelta(hours=5, minutes=30))
NSE = (1234 << 8) | 1  # segment 1
MCX = (5678 << 8) | 7  # segment 7
CDS = (91 << 8) | 3


def ist(h: int, m: int, s: float = 0, day: int = 7) -> float:
    """Epoch seconds of 2026-12-{day} h:m:s IST."""
    return datetime(2026, 12, day, h, m, tzinfo=IST).timestamp() + s


def full(token: int, t: float, price: float, volume: int, received: float | None = None) -> dict[str, Any]:
    """A full-mode tick as the bus carries it: exchange time in seconds, receive time later."""
    return {
        "instrument_token": token, "mode": "full", "last_price": price, "volume_traded": volume,
        "exchange_timestamp": int(t), "received_at_ns": int(((received or t) + 0.3) * 1e9),
    }  # fmt: skip


def ltp(token: int, received: float, price: float) -> dict[str, Any]:
    return {
        "instrument_token": token,
        "mode": "ltp",
        "last_price": price,
        "received_at_ns": int(received * 1e9),
    }


def bar(token: int, interval: str, start: float, end: float, o: float, h: float, lo: float, c: float,
        volume: int, ticks: int) -> dict[str, Any]:  # fmt: skip
    return {
        "token": token, "interval": interval, "start": int(start), "end": int(end), "open": o,
        "high": h, "low": lo, "close": c, "volume": volume, "ticks": ticks,
    }  # fmt: skip


def feed(builder: BarBuilder, ticks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tick in ticks:
        out += builder.add(tick)
    return out


def test_exchange_from_the_segment_byte() -> None:
    assert (exchange_of(NSE), exchange_of(MCX), exchange_of(CDS)) == ("NSE", "MCX", "CDS")
    assert bars_key("kite", "5m", NSE) == f"kite:bars:5m:{NSE}"


@pytest.mark.parametrize(
    ("token", "interval", "at", "start"),
    [
        (NSE, "1m", ist(9, 14, 59), ist(9, 14)),
        (NSE, "1m", ist(9, 15), ist(9, 15)),
        (NSE, "5m", ist(9, 14, 59), ist(9, 10)),
        (NSE, "5m", ist(9, 19, 59), ist(9, 15)),
        (NSE, "15m", ist(9, 29, 59), ist(9, 15)),
        (NSE, "15m", ist(9, 30), ist(9, 30)),
        (NSE, "1h", ist(9, 14, 59), ist(8, 15)),
        (NSE, "1h", ist(10, 14, 59), ist(9, 15)),
        (NSE, "1h", ist(15, 29), ist(15, 15)),
        (MCX, "1h", ist(9, 59, 59), ist(9, 0)),
        (MCX, "1h", ist(23, 29), ist(23, 0)),
        (CDS, "15m", ist(9, 14, 59), ist(9, 0)),
        (NSE, "day", ist(9, 15), ist(9, 15)),
        (NSE, "day", ist(15, 29, 59), ist(9, 15)),
        (NSE, "day", ist(9, 8), ist(9, 15)),  # pre-open: that date's day bar
        (MCX, "day", ist(23, 29), ist(9, 0)),
        (MCX, "day", ist(0, 10, day=8), ist(9, 0, day=8)),
    ],
)
def test_bars_align_to_the_exchange_session_open(token: int, interval: str, at: float, start: float) -> None:
    assert bar_start(token, interval, at) == int(start)


def test_a_scripted_session_gives_the_hand_computed_bars() -> None:
    b = BarBuilder(["1m", "5m"], grace=2.0)
    out = feed(b, [
        full(NSE, ist(9, 14, 59), 100.0, 5000),  # first tick of the day: the base, volume 0
        full(NSE, ist(9, 15, 0), 101.0, 5200),   # +200, a new minute (the 09:14 bar waits for the grace)
        full(NSE, ist(9, 15, 20), 103.5, 5300),  # +100
        full(NSE, ist(9, 15, 40), 99.0, 5350),   # +50
        full(NSE, ist(9, 15, 59), 100.5, 5400),  # +50
    ])  # fmt: skip
    assert out == [  # the 09:15:20 tick is past 09:15 + 2 s: the pre-open bars close
        bar(NSE, "1m", ist(9, 14), ist(9, 15), 100.0, 100.0, 100.0, 100.0, 0, 1),
        bar(NSE, "5m", ist(9, 10), ist(9, 15), 100.0, 100.0, 100.0, 100.0, 0, 1),
    ]
    assert b.add(full(NSE, ist(9, 16, 1), 102.0, 5500)) == []  # +100; 09:15 bar open till 09:16:02
    closed = b.add(full(NSE, ist(9, 16, 2), 102.5, 5510))  # +10
    assert closed == [bar(NSE, "1m", ist(9, 15), ist(9, 16), 101.0, 103.5, 99.0, 100.5, 400, 4)]
    assert b.flush(ist(9, 20, 1)) == [
        bar(NSE, "1m", ist(9, 16), ist(9, 17), 102.0, 102.5, 102.0, 102.5, 110, 2)
    ]
    assert b.flush(ist(9, 20, 2)) == [
        bar(NSE, "5m", ist(9, 15), ist(9, 20), 101.0, 103.5, 99.0, 102.5, 510, 6)
    ]
    assert b.late == 0


def test_the_pre_open_5m_bar_closes_once_its_grace_is_over() -> None:
    b = BarBuilder(["5m"])
    assert b.add(full(NSE, ist(9, 14, 59), 100.0, 5000)) == []
    assert b.add(full(NSE, ist(9, 15, 1), 101.0, 5100)) == []  # within 09:15 + 2 s
    assert b.add(full(NSE, ist(9, 15, 2), 102.0, 5150)) == [
        bar(NSE, "5m", ist(9, 10), ist(9, 15), 100.0, 100.0, 100.0, 100.0, 0, 1)
    ]


def test_a_quiet_minute_still_emits_the_bar_before_and_a_minute_without_ticks_none() -> None:
    b = BarBuilder(["1m"])
    feed(b, [full(NSE, ist(10, 0, 5), 50.0, 100), full(NSE, ist(10, 0, 30), 51.0, 130)])
    assert b.flush(ist(10, 1, 1)) == []  # the grace is not over yet
    assert b.flush(ist(10, 1, 2)) == [bar(NSE, "1m", ist(10, 0), ist(10, 1), 50.0, 51.0, 50.0, 51.0, 30, 2)]
    assert b.flush(ist(10, 5)) == []  # 10:01 .. 10:04 had no tick: no bars
    b.add(full(NSE, ist(10, 5, 10), 52.0, 200))  # the 70 traded while quiet count here
    assert b.flush(ist(10, 6, 2)) == [bar(NSE, "1m", ist(10, 5), ist(10, 6), 52.0, 52.0, 52.0, 52.0, 70, 1)]


def test_a_late_tick_within_the_grace_joins_its_bar_beyond_it_is_dropped_and_counted() -> None:
    b = BarBuilder(["1m"], grace=2.0)
    feed(b, [full(NSE, ist(11, 0, 10), 10.0, 1000), full(NSE, ist(11, 0, 50), 11.0, 1010)])
    assert b.add(full(NSE, ist(11, 1, 1), 12.0, 1030)) == []
    # exchange time 11:00:58 arriving after 11:01:01: within the grace, the 11:00 bar is still open
    # (the newest time in its bar, so its price is the close; its volume is in the newer tick's)
    assert b.add(full(NSE, ist(11, 0, 58), 9.0, 1020)) == []
    assert b.late == 0
    closed = b.add(full(NSE, ist(11, 1, 3), 12.5, 1040))
    assert closed == [bar(NSE, "1m", ist(11, 0), ist(11, 1), 10.0, 11.0, 9.0, 9.0, 10, 3)]
    assert b.add(full(NSE, ist(11, 0, 59), 8.0, 1025)) == []  # its bar went out: late
    assert b.late == 1
    assert b.flush(ist(11, 2, 2)) == [bar(NSE, "1m", ist(11, 1), ist(11, 2), 12.0, 12.5, 12.0, 12.5, 30, 2)]


def test_a_tick_past_the_grace_of_a_bar_that_never_opened_is_late() -> None:
    b = BarBuilder(["1m"], grace=2.0)
    b.add(full(NSE, ist(11, 5, 30), 10.0, 1000))
    assert b.add(full(NSE, ist(11, 3, 10), 9.0, 990)) == []  # 11:04:02 passed long ago
    assert b.late == 1
    assert b.pending() == [bar(NSE, "1m", ist(11, 5), ist(11, 6), 10.0, 10.0, 10.0, 10.0, 0, 1)]


def test_ltp_ticks_use_the_receive_time_and_add_no_volume() -> None:
    b = BarBuilder(["1m"], grace=0.0)
    feed(b, [ltp(NSE, ist(9, 15, 59.9), 20.0), ltp(NSE, ist(9, 15, 59.95), 21.0)])
    assert b.add(ltp(NSE, ist(9, 16, 0.01), 22.0)) == [
        bar(NSE, "1m", ist(9, 15), ist(9, 16), 20.0, 21.0, 20.0, 21.0, 0, 2)
    ]


def test_full_ticks_use_the_exchange_time_not_the_receive_time() -> None:
    b = BarBuilder(["1m"], grace=0.0)
    b.add(full(NSE, ist(9, 15, 59), 20.0, 10, received=ist(9, 16, 3)))  # received in the next minute
    assert b.pending()[0]["start"] == int(ist(9, 15))


def test_a_decreasing_volume_is_a_new_base_never_a_negative_volume() -> None:
    b = BarBuilder(["day"])
    feed(b, [full(NSE, ist(15, 29), 10.0, 90_000), full(NSE, ist(15, 29, 30), 10.0, 90_500)])
    closed = b.add(full(NSE, ist(9, 15, 5, day=8), 11.0, 300))  # the next day: the count starts again
    assert closed == [bar(NSE, "day", ist(9, 15), ist(9, 15, day=8), 10.0, 10.0, 10.0, 10.0, 500, 2)]
    b.add(full(NSE, ist(9, 20, 0, day=8), 12.0, 1300))
    assert b.pending() == [
        bar(NSE, "day", ist(9, 15, day=8), ist(9, 15, day=9), 11.0, 12.0, 11.0, 12.0, 1000, 2)
    ]


def test_tokens_and_intervals_are_kept_apart() -> None:
    b = BarBuilder(["1m", "1h"], grace=0.0)
    feed(b, [full(NSE, ist(10, 0, 1), 1.0, 10), full(MCX, ist(10, 0, 1), 2.0, 20)])
    out = b.flush(ist(10, 1))
    assert sorted((x["token"], x["interval"], x["close"]) for x in out) == [
        (NSE, "1m", 1.0),
        (MCX, "1m", 2.0),
    ]
    assert {(x["token"], x["interval"], x["start"]) for x in b.pending()} == {
        (NSE, "1h", int(ist(9, 15))),
        (MCX, "1h", int(ist(10, 0))),
    }


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="intervals"):
        BarBuilder(["2m"])
    with pytest.raises(ValueError, match="grace"):
        BarBuilder(["1m"], grace=-1)
