"""Hypothesis strategies for ticks that Kite could send."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from kitewire.codec import MODES, SEGMENTS, divisor_of, is_tradable

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)


@st.composite
def tokens(draw: st.DrawFn) -> int:
    segment = draw(st.sampled_from(sorted(SEGMENTS.values())))
    return draw(st.integers(0, 2**24 - 1)) << 8 | segment


@st.composite
def ticks(draw: st.DrawFn, mode: str | None = None) -> dict[str, Any]:
    """A tick dict shaped as decode_frame returns it, with prices on the instrument's grid."""
    token = draw(tokens())
    mode = mode or draw(st.sampled_from(MODES))
    div = divisor_of(token)

    def price() -> float:
        return draw(U32) / div

    tick: dict[str, Any] = {
        "tradable": is_tradable(token), "mode": mode, "instrument_token": token,
        "last_price": price(),
    }  # fmt: skip
    if mode == "ltp":
        return tick
    if tick["tradable"]:
        tick |= {
            "last_traded_quantity": draw(U32), "average_traded_price": price(),
            "volume_traded": draw(U32), "total_buy_quantity": draw(U32),
            "total_sell_quantity": draw(U32),
        }  # fmt: skip
    tick["ohlc"] = {"open": price(), "high": price(), "low": price(), "close": price()}
    close = tick["ohlc"]["close"]
    tick["change"] = (tick["last_price"] - close) * 100 / close if close else 0.0
    if mode == "full":
        if tick["tradable"]:
            tick |= {
                "last_trade_time": draw(U32), "oi": draw(U32), "oi_day_high": draw(U32),
                "oi_day_low": draw(U32),
            }  # fmt: skip
        tick["exchange_timestamp"] = draw(U32)
        if tick["tradable"]:
            tick["depth"] = {
                side: [{"quantity": draw(U32), "price": price(), "orders": draw(U16)} for _ in range(5)]
                for side in ("buy", "sell")
            }
    return tick
