"""A seeded synthetic market: instruments whose ticks stay consistent with each other.

Prices move on each instrument's tick grid as a random walk, in raw integer units
(rupees x the segment's divisor), so a tick survives the codec exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from kitewire.codec import MODE_FULL, MODE_LTP, SEGMENTS, divisor_of, is_tradable

_SEGMENT_NAMES = {number: name.upper() for name, number in SEGMENTS.items()}


@dataclass(frozen=True)
class Instrument:
    """One instrument of the built-in list (tokens are Kite's)."""

    token: int
    exchange: str
    symbol: str
    price: float  # a plausible previous close, rupees
    tick_size: float = 0.05
    open_interest: bool = False


# Equities and indices carry Kite's real instrument tokens; derivatives' tokens change
# with every expiry, so these use their segment's byte on made-up ids.
INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument(738561, "NSE", "RELIANCE", 1290.0),
    Instrument(408065, "NSE", "INFY", 1560.0),
    Instrument(2953217, "NSE", "TCS", 3150.0),
    Instrument(341249, "NSE", "HDFCBANK", 985.0),
    Instrument(1270529, "NSE", "ICICIBANK", 1390.0),
    Instrument(779521, "NSE", "SBIN", 960.0),
    Instrument(424961, "NSE", "ITC", 405.0),
    Instrument(2939649, "NSE", "LT", 4020.0),
    Instrument(1510401, "NSE", "AXISBANK", 1270.0),
    Instrument(492033, "NSE", "KOTAKBANK", 2120.0),
    Instrument(2714625, "NSE", "BHARTIARTL", 2080.0),
    Instrument(884737, "NSE", "TATAMOTORS", 395.0),
    Instrument(256265, "NSE", "NIFTY 50", 26150.0),
    Instrument(260105, "NSE", "NIFTY BANK", 59200.0),
    Instrument(9001 << 8 | 2, "NFO", "NIFTY25DECFUT", 26260.0, 0.1, True),
    Instrument(9002 << 8 | 2, "NFO", "BANKNIFTY25DECFUT", 59450.0, 0.2, True),
    Instrument(9003 << 8 | 2, "NFO", "RELIANCE25DECFUT", 1296.0, 0.1, True),
    Instrument(9004 << 8 | 3, "CDS", "USDINR25DECFUT", 89.4525, 0.0025, True),
    Instrument(9005 << 8 | 6, "BCD", "USDINR25DECFUT", 89.4550, 0.0025, True),
)
BY_TOKEN = {instrument.token: instrument for instrument in INSTRUMENTS}


def instrument_for(token: int) -> Instrument:
    """The built-in instrument, or a generic one of the token's segment."""
    known = BY_TOKEN.get(token)
    if known is not None:
        return known
    segment = token & 0xFF
    exchange = _SEGMENT_NAMES.get(segment, f"SEG{segment}")
    top = min(5000.0, 2**28 / divisor_of(token))  # room to walk without leaving 32 bits
    price = top / 100 + (token * 2654435761 % 10_000) / 10_000 * top  # stable per token
    return Instrument(token, exchange, f"GENERIC{token}", price, 0.05, segment in (2, 3, 5, 6, 7))


@dataclass
class Quote:
    """The running state of one instrument, in raw price units."""

    instrument: Instrument
    step: int  # the tick size in raw units
    close: int
    last: int
    open: int
    high: int
    low: int
    volume: int = 0
    turnover: int = 0  # sum of raw price x quantity, for the average price
    last_quantity: int = 0
    buy_quantity: int = 0
    sell_quantity: int = 0
    oi: int = 0
    oi_high: int = 0
    oi_low: int = 0
    last_trade_time: int = 0
    depth: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)


class Market:
    """Seeded random walks for any set of tokens; ``tick`` advances one and returns its tick."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._quotes: dict[int, Quote] = {}

    def quote(self, token: int) -> Quote:
        state = self._quotes.get(token)
        if state is None:
            state = self._quotes[token] = self._open(instrument_for(token))
        return state

    def _open(self, instrument: Instrument) -> Quote:
        div = divisor_of(instrument.token)
        step = max(1, round(instrument.tick_size * div))
        close = round(instrument.price * div / step) * step
        gap = self._rng.randint(-20, 20) * step
        first = max(step, close + gap)
        state = Quote(instrument, step, close, first, first, first, first)
        if instrument.open_interest:
            state.oi = state.oi_high = state.oi_low = self._rng.randint(10_000, 5_000_000)
        return state

    def tick(self, token: int, mode: str, now: int) -> dict[str, Any]:
        """Advance the instrument by one trade and return its tick as the codec takes it."""
        state = self.quote(token)
        rng = self._rng
        state.last = max(state.step, state.last + rng.choice((-2, -1, -1, 0, 0, 1, 1, 2)) * state.step)
        state.high = max(state.high, state.last)
        state.low = min(state.low, state.last)
        tradable = is_tradable(token)
        if tradable:
            quantity = rng.randint(1, 50) * (1 if state.instrument.exchange in ("NSE", "BSE") else 25)
            state.last_quantity = quantity
            state.volume += quantity
            state.turnover += quantity * state.last
            state.last_trade_time = now
            state.depth = self._depth(state)
            state.buy_quantity = sum(q for q, _, _ in state.depth["buy"]) + rng.randint(0, 100_000)
            state.sell_quantity = sum(q for q, _, _ in state.depth["sell"]) + rng.randint(0, 100_000)
            if state.instrument.open_interest:
                state.oi = max(0, state.oi + rng.randint(-500, 500))
                state.oi_high = max(state.oi_high, state.oi)
                state.oi_low = min(state.oi_low, state.oi)
        return self._as_tick(state, mode, now)

    def _depth(self, state: Quote) -> dict[str, list[tuple[int, int, int]]]:
        rng, step, last = self._rng, state.step, state.last
        best_bid = max(step, last - rng.randint(0, 1) * step)
        best_ask = best_bid + step if best_bid < last else last + step
        return {
            "buy": [
                (rng.randint(1, 5000), max(0, best_bid - i * step), rng.randint(1, 40)) for i in range(5)
            ],
            "sell": [(rng.randint(1, 5000), best_ask + i * step, rng.randint(1, 40)) for i in range(5)],
        }

    @staticmethod
    def _as_tick(state: Quote, mode: str, now: int) -> dict[str, Any]:
        token = state.instrument.token
        div = divisor_of(token)
        tick: dict[str, Any] = {
            "instrument_token": token,
            "mode": mode,
            "last_price": state.last / div,
        }
        if mode == MODE_LTP:
            return tick
        tick["ohlc"] = {
            "open": state.open / div, "high": state.high / div,
            "low": state.low / div, "close": state.close / div,
        }  # fmt: skip
        if is_tradable(token):
            average = state.turnover // state.volume if state.volume else state.last
            tick |= {
                "last_traded_quantity": state.last_quantity,
                "average_traded_price": average / div,
                "volume_traded": state.volume,
                "total_buy_quantity": state.buy_quantity,
                "total_sell_quantity": state.sell_quantity,
            }
        if mode == MODE_FULL:
            tick["exchange_timestamp"] = now
            if is_tradable(token):
                tick |= {
                    "last_trade_time": state.last_trade_time,
                    "oi": state.oi, "oi_day_high": state.oi_high, "oi_day_low": state.oi_low,
                    "depth": {
                        side: [
                            {"quantity": q, "price": p / div, "orders": o} for q, p, o in levels
                        ]
                        for side, levels in state.depth.items()
                    },
                }  # fmt: skip
        return tick
