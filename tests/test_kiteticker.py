"""The drop-in's pure parts: ticks as the official client shapes them, client ids."""

from __future__ import annotations

import re

import pytest

from consumers.kiteticker import KiteTicker, as_official, default_client_id
from kitewire import codec
from simulator.market import Market

INFY = 408065


def test_a_richer_tick_is_cut_to_the_mode_asked_for() -> None:
    packet = codec.encode_packet(Market(1).tick(INFY, "full", 1764330000))
    (tick,), _ = codec.decode_frame(codec.encode_frame([packet]))
    tick |= {"received_at_ns": 5, "seq": 9, "epoch": 1}
    ltp = as_official(tick, "ltp")
    price = tick["last_price"]
    assert ltp == {"tradable": True, "mode": "ltp", "instrument_token": INFY, "last_price": price}
    quote = as_official(tick, "quote")
    assert "depth" not in quote and "last_trade_time" not in quote and quote["mode"] == "quote"
    full = as_official(tick, "full")
    assert full["exchange_timestamp"].timestamp() == 1764330000
    assert not {"received_at_ns", "seq", "epoch"} & set(full)


@pytest.mark.parametrize("mode", ["ltp", "quote", "full"])
def test_modes_match_the_constants(mode: str) -> None:
    assert mode in {KiteTicker.MODE_LTP, KiteTicker.MODE_QUOTE, KiteTicker.MODE_FULL}


def test_the_default_client_id_is_a_valid_one() -> None:
    assert re.fullmatch(r"kiteticker-[A-Za-z0-9_.-]+-\d+", default_client_id())
