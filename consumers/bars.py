"""OHLCV bars from ticks, aligned to each exchange's session open, and a reader of the
bars ``kitebus bars`` publishes.

``BarBuilder`` is pure (no I/O, no clock): feed it tick dicts with ``add`` and call
``flush(now)`` now and then; both return the bars that closed. See docs/bars.md for
the rules (times, volume, late ticks, when a bar closes).

    builder = BarBuilder(("1m", "5m"))
    for tick in ticks:
        for bar in builder.add(tick):
            ...

``BarReader`` subscribes to ``{ns}:bars:{interval}:{token}`` and yields bars as dicts,
the history kept in Redis first (for a late joiner), then live ones.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgpack

from consumers.pubsub import PubSub, open_pubsub, url_of
from kitewire.codec import SEGMENTS
from rediswire import bus

Bar = dict[str, Any]
Tick = dict[str, Any]
log = logging.getLogger("kitebus.bars")

INTERVALS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "day": 86400}
IST_OFFSET = 5 * 3600 + 30 * 60  # seconds east of UTC; India has no daylight saving
DEFAULT_GRACE = 2.0

# Session open (IST, hours and minutes) per exchange; bars of every interval are aligned to it.
SESSION_OPEN: dict[str, tuple[int, int]] = {
    "NSE": (9, 15), "BSE": (9, 15), "NFO": (9, 15), "BFO": (9, 15), "INDICES": (9, 15),
    "CDS": (9, 0), "BCD": (9, 0), "MCX": (9, 0), "MCXSX": (9, 0), "NCO": (9, 0),
}  # fmt: skip
DEFAULT_OPEN = (9, 15)  # a segment not in the table
_EXCHANGE_OF_SEGMENT = {segment: name.upper() for name, segment in SEGMENTS.items()}


def bars_key(ns: str, interval: str, token: int) -> str:
    """The channel each closed bar is published on, and the list that keeps the last N."""
    return f"{ns}:bars:{interval}:{token}"


def exchange_of(token: int) -> str:
    """The exchange (segment) of an instrument token: its low byte, as Kite encodes it."""
    return _EXCHANGE_OF_SEGMENT.get(token & 0xFF, "")


def session_open_offset(token: int) -> int:
    """Seconds after IST midnight at which the token's exchange opens."""
    hour, minute = SESSION_OPEN.get(exchange_of(token), DEFAULT_OPEN)
    return hour * 3600 + minute * 60


def bar_start(token: int, interval: str, t: float) -> int:
    """Epoch second at which the ``interval`` bar holding time ``t`` starts.

    Intraday bars are ``step`` seconds long, counted from the session open (so a tick at
    09:14:59 IST falls in the bar before the open's); the ``day`` bar of an IST date
    starts at that date's open and runs to the next date's, and holds that date's
    pre-open ticks too.
    """
    step = INTERVALS[interval]
    opens = session_open_offset(token) - IST_OFFSET  # the open as seconds after UTC midnight
    if interval == "day":
        ist_midnight = (int(t) + IST_OFFSET) // 86400 * 86400 - IST_OFFSET
        return ist_midnight + IST_OFFSET + opens
    return int((t - opens) // step * step + opens)


def tick_time(tick: Tick) -> float:
    """The exchange timestamp where the tick carries one, else the publisher's receive time."""
    stamp = tick.get("exchange_timestamp")
    if stamp:
        return float(stamp)
    return tick["received_at_ns"] / 1e9


class _Series:
    """The bars of one token and interval still open (keyed by start), and where it stands."""

    __slots__ = ("emitted", "last", "open")

    def __init__(self) -> None:
        self.open: dict[int, Bar] = {}
        self.emitted = -1  # start of the newest bar closed
        self.last = float("-inf")  # newest time seen (a tick's or flush's)


class BarBuilder:
    """Bars of ``intervals`` for every token it is fed. Not thread-safe; pure.

    ``late`` counts ticks dropped because their bar had closed (or would have: its end
    plus ``grace`` already passed); ``bars`` counts bars emitted.
    """

    def __init__(self, intervals: Iterable[str] = ("1m",), grace: float = DEFAULT_GRACE) -> None:
        self.intervals = tuple(intervals)
        unknown = [i for i in self.intervals if i not in INTERVALS]
        if unknown or not self.intervals:
            raise ValueError(f"intervals must be some of {', '.join(INTERVALS)} (got {unknown or 'none'})")
        if grace < 0:
            raise ValueError("grace must be 0 or more seconds")
        self.grace = grace
        self.late = 0
        self.bars = 0
        self._series: dict[tuple[int, str], _Series] = {}
        self._volume: dict[int, tuple[int, float]] = {}  # token -> (cumulative volume_traded, its time)

    def _volume_of(self, tick: Tick, t: float) -> int:
        """Volume traded since the token's previous tick: 0 for its first tick (nothing to
        subtract) and after a decrease (a new day or a reset, which becomes the new base)."""
        cumulative = tick.get("volume_traded")
        if cumulative is None:  # ltp mode, indices: no volume
            return 0
        token = tick["instrument_token"]
        previous = self._volume.get(token)
        if previous is None:
            self._volume[token] = (cumulative, t)
            return 0
        base, newest = previous
        if t < newest:  # an older tick come late: what it counted is in the base already
            return 0
        self._volume[token] = (cumulative, t)
        return max(0, int(cumulative - base))  # a decrease: 0, and it is the new base

    def add(self, tick: Tick) -> list[Bar]:
        """Put a tick into its bars; return the bars its time closed, oldest first."""
        token = tick["instrument_token"]
        t = tick_time(tick)
        price = tick["last_price"]
        volume = self._volume_of(tick, t)  # once per tick, whether or not it lands in a bar
        closed: list[Bar] = []
        counted_late = False
        for interval in self.intervals:
            series = self._series.get((token, interval))
            if series is None:
                series = self._series[(token, interval)] = _Series()
            start = bar_start(token, interval, t)
            end = start + INTERVALS[interval]
            if start <= series.emitted or series.last >= end + self.grace:
                counted_late = True  # its bar is gone: counted once however many intervals drop it
                continue
            bar = series.open.get(start)
            if bar is None:
                series.open[start] = {
                    "token": token, "interval": interval, "start": start, "end": end,
                    "open": price, "high": price, "low": price, "close": price,
                    "volume": volume, "ticks": 1, "_t": t,
                }  # fmt: skip
            else:
                bar["high"] = max(bar["high"], price)
                bar["low"] = min(bar["low"], price)
                if t >= bar["_t"]:  # a late tick updates high/low/volume, not the close
                    bar["close"] = price
                    bar["_t"] = t
                bar["volume"] += volume
                bar["ticks"] += 1
            closed += self._advance(series, t)
        if counted_late:
            self.late += 1
            log.debug("late tick dropped: token=%s time=%.3f", token, t)
        return closed

    def flush(self, now: float) -> list[Bar]:
        """The bars whose end plus grace is at or before ``now`` (epoch seconds), closed:
        a quiet token's last bar goes out although no later tick came."""
        closed: list[Bar] = []
        for series in self._series.values():
            closed += self._advance(series, now)
        return closed

    def _advance(self, series: _Series, t: float) -> list[Bar]:
        if t > series.last:
            series.last = t
        done = sorted(s for s, bar in series.open.items() if bar["end"] + self.grace <= series.last)
        out = []
        for start in done:
            bar = series.open.pop(start)
            del bar["_t"]
            series.emitted = max(series.emitted, start)
            out.append(bar)
        self.bars += len(out)
        return out

    def pending(self) -> list[Bar]:
        """The bars still open (not emitted), for a look; they stay open."""
        return [
            {k: v for k, v in bar.items() if k != "_t"}
            for s in self._series.values()
            for bar in s.open.values()
        ]


class BarReader:
    """Bars of some tokens and intervals from the bus: for each, the history kept in its
    list ``{ns}:bars:{interval}:{token}`` (oldest first), then live ones as published.

        async with BarReader("redis://localhost:6379/0", [408065], ["1m"]) as reader:
            async for bar in reader:
                ...

    Subscribed before the history is read, so nothing falls between; a bar seen in both
    (same token, interval and start) is yielded once.
    """

    def __init__(
        self,
        source: str | bus.Client,
        tokens: Iterable[int],
        intervals: Iterable[str] = ("1m",),
        *,
        namespace: str = "kite",
        cluster: bool | None = None,
        history: bool = True,
    ) -> None:
        self.tokens = [int(t) for t in tokens]
        self.intervals = list(intervals)
        if any(i not in INTERVALS for i in self.intervals):
            raise ValueError(f"intervals must be some of {', '.join(INTERVALS)}")
        self.ns = namespace
        self.history = history
        self._source = source
        self._cluster = cluster
        self._redis: bus.Client | None = None
        self._pubsub: PubSub | None = None
        self._pending: list[Bar] = []
        self._newest: dict[tuple[int, str], int] = {}  # (token, interval) -> start of the newest yielded

    async def __aenter__(self) -> BarReader:
        if isinstance(self._source, str):
            self._redis, url = bus.connect(self._source, self._cluster), self._source
        else:
            self._redis, url = self._source, url_of(self._source)
        self._pubsub = await open_pubsub(url, bus.is_cluster(self._redis))
        names = [bars_key(self.ns, i, t) for t in self.tokens for i in self.intervals]
        await self._pubsub.subscribe(*names)
        if self.history:
            for name in names:
                for raw in await self._redis.lrange(name, 0, -1):  # type: ignore[misc]
                    self._pending.append(msgpack.unpackb(raw))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pubsub is not None:
            await self._pubsub.close()
        if isinstance(self._source, str) and self._redis is not None:
            await self._redis.aclose()

    def _new(self, bar: Bar) -> bool:
        key = (bar["token"], bar["interval"])
        if bar["start"] <= self._newest.get(key, -1):
            return False
        self._newest[key] = bar["start"]
        return True

    async def batch(self, wait: float = 1.0) -> list[Bar]:
        """The bars there are (history first), waiting up to ``wait`` seconds for one."""
        out = [bar for bar in self._pending if self._new(bar)]
        self._pending.clear()
        assert self._pubsub is not None, "use BarReader in async with"
        messages = await self._pubsub.read(0.0 if out else wait)
        out += [bar for bar in (msgpack.unpackb(data) for _, data in messages) if self._new(bar)]
        return out

    async def bars(self) -> AsyncIterator[Bar]:
        """History, then live bars, forever."""
        while True:
            for bar in await self.batch():
                yield bar

    def __aiter__(self) -> AsyncIterator[Bar]:
        return self.bars()


__all__ = [
    "DEFAULT_GRACE", "INTERVALS", "SESSION_OPEN", "Bar", "BarBuilder", "BarReader",
    "bar_start", "bars_key", "exchange_of", "tick_time",
]  # fmt: skip
