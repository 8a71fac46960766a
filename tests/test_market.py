"""The synthetic market keeps its ticks consistent with each other."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kitewire import codec
from simulator.market import INSTRUMENTS, Market, instrument_for
from tests.strategies import tokens

ANY_TOKEN = st.one_of(st.sampled_from([i.token for i in INSTRUMENTS]), tokens())


def test_builtin_tokens_carry_their_segment() -> None:
    segments = {"NSE": {1, 9}, "NFO": {2}, "CDS": {3}, "BCD": {6}}
    for instrument in INSTRUMENTS:
        assert instrument.token & 0xFF in segments[instrument.exchange], instrument
    assert instrument_for(256265).symbol == "NIFTY 50"
    assert instrument_for(123 << 8 | 2).exchange == "NFO"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), ANY_TOKEN, st.sampled_from(codec.MODES))
def test_invariants_hold_over_many_ticks(seed: int, token: int, mode: str) -> None:
    market = Market(seed)
    previous_volume = 0
    for second in range(300):
        tick = market.tick(token, mode, 1_764_300_000 + second)
        assert codec.decode_frame(codec.encode_frame([codec.encode_packet(tick)]))[0][0] == {
            **tick,
            **_derived(tick),
        }
        assert tick["last_price"] > 0
        if mode == "ltp":
            continue
        ohlc = tick["ohlc"]
        assert ohlc["low"] <= ohlc["open"] <= ohlc["high"]
        assert ohlc["low"] <= tick["last_price"] <= ohlc["high"]
        if not codec.is_tradable(token):
            continue
        assert tick["volume_traded"] >= previous_volume + tick["last_traded_quantity"]
        previous_volume = tick["volume_traded"]
        assert ohlc["low"] <= tick["average_traded_price"] <= ohlc["high"]
        if mode == "full":
            assert tick["oi_day_low"] <= tick["oi"] <= tick["oi_day_high"]
            bids, asks = tick["depth"]["buy"], tick["depth"]["sell"]
            assert [b["price"] for b in bids] == sorted((b["price"] for b in bids), reverse=True)
            assert [a["price"] for a in asks] == sorted(a["price"] for a in asks)
            assert bids[0]["price"] <= tick["last_price"] <= asks[0]["price"]
            assert bids[0]["price"] < asks[0]["price"]
            assert tick["total_buy_quantity"] >= sum(b["quantity"] for b in bids)
            assert tick["total_sell_quantity"] >= sum(a["quantity"] for a in asks)


def _derived(tick: dict) -> dict:
    derived: dict = {"tradable": codec.is_tradable(tick["instrument_token"])}
    if "ohlc" in tick:
        close = tick["ohlc"]["close"]
        derived["change"] = (tick["last_price"] - close) * 100 / close if close else 0.0
    return derived
