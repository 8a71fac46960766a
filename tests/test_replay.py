"""kitebus replay's pure parts: its options, the window, the holes, the steps, the symbols."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from consumers.recorder import IST
from kitebus.replay import Hole, _steps, holes_of, in_window, instruments_for, parse_clock, parse_speed
from kitewire.instruments import parse_instruments
from simulator.market import INSTRUMENTS


def test_speed_is_a_positive_factor_or_max() -> None:
    assert parse_speed("max") is None and parse_speed("2.5") == 2.5
    for bad in ("0", "-1", "inf", "nan", "fast", ""):
        with pytest.raises(ValueError, match="--speed"):
            parse_speed(bad)


def test_clock_is_a_time_of_day() -> None:
    assert parse_clock("09:15") == dt.time(9, 15) and parse_clock("15:29:59") == dt.time(15, 29, 59)
    with pytest.raises(ValueError, match="not a time of day"):
        parse_clock("9.15")


def _at(hour: int, minute: int) -> int:
    return int(dt.datetime(2026, 12, 7, hour, minute, tzinfo=IST).timestamp() * 1e9)


def test_the_window_is_the_ist_clock_of_the_recorder_from_included_to_excluded() -> None:
    ticks = [{"recorded_at_ns": _at(9, m)} for m in (14, 15, 16, 30)]
    assert in_window(ticks, dt.time(9, 15), dt.time(9, 30)) == ticks[1:3]
    assert in_window(ticks, None, dt.time(9, 15)) == ticks[:1] and in_window(ticks, None, None) == ticks


def _event(kind: str, token: int | None, at: int) -> dict:
    return {"kind": kind, "token": token, "at": at, "from_seq": None, "to_seq": None, "reason": ""}


def test_holes_are_stale_to_live_per_token_together_when_they_match_and_cut_to_the_window() -> None:
    events = [
        _event("start", None, 0), _event("stale", 1, 10), _event("stale", 2, 10), _event("live", 1, 20),
        _event("live", 2, 20), _event("stale", 3, 30), _event("stale", 3, 35),  # the first stale counts
        _event("gap", 4, 40), _event("stale", 5, 90), _event("live", 5, 95),
    ]  # fmt: skip
    assert holes_of(events, 0, 60) == [Hole(10, 20, frozenset({1, 2})), Hole(30, 60, frozenset({3}))]
    assert holes_of(events, 15, 32) == [Hole(15, 20, frozenset({1, 2})), Hole(30, 32, frozenset({3}))]
    assert holes_of([], 0, 60) == []


def test_steps_are_the_runs_the_recorder_received_together() -> None:
    ticks = [{"recorded_at_ns": at, "n": n} for n, at in enumerate((5, 5, 6, 5))]
    assert [(at, [t["n"] for t in step]) for at, step in _steps(ticks)] == [(5, [0, 1]), (6, [2]), (5, [3])]


def test_the_replays_instruments_name_known_tokens_and_number_the_others(tmp_path: Path) -> None:
    known = INSTRUMENTS[0]
    path = tmp_path / "instruments.csv"
    instruments_for([known.token, 7 << 8 | 7], path)  # an MCX token the simulator does not know
    symbols, skipped = parse_instruments(path.read_text())
    assert symbols == {f"{known.exchange}:{known.symbol}": known.token, f"MCX:{7 << 8 | 7}": 7 << 8 | 7}
    assert skipped == 0
