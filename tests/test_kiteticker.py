"""The drop-in's pure parts: ticks as the official client shapes them, client ids, the
account whose order updates it gets."""

from __future__ import annotations

import json
import re

import pytest

from consumers.kiteticker import KiteTicker, account_of, as_official, default_client_id
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


def test_the_order_updates_are_those_of_the_account_of_its_api_key(monkeypatch) -> None:
    accounts = [{"name": "b", "api_key": "key-b", "access_token": "t"}]
    monkeypatch.setenv("KITEBUS_ACCOUNTS", json.dumps(accounts))
    assert account_of("key-b") == "b"
    assert account_of("the-default-key") == "default" and account_of(None) == "default"
    bus = {"redis_url": "redis://h", "namespace": "n", "redis_cluster": False}
    assert KiteTicker("key-b", "x", **bus).account == "b"
    assert KiteTicker("key-b", "x", **bus, account="c").account == "c"
    monkeypatch.setenv("KITEBUS_ACCOUNTS", "not json")  # a broken environment is the default account
    assert account_of("key-b") == "default"


def test_a_key_of_no_account_among_several_is_the_default_account_with_a_warning(monkeypatch, caplog) -> None:
    accounts = [{"name": "b", "api_key": "key-b", "access_token": "t"}]
    monkeypatch.setenv("KITEBUS_ACCOUNTS", json.dumps(accounts))
    monkeypatch.setenv("KITE_API_KEY", "key-a")
    with caplog.at_level("WARNING", logger="kitebus.kiteticker"):
        assert account_of("key-a") == "default" and account_of("key-b") == "b"
    assert not caplog.records  # the default account's own key, and b's: nothing to say
    with caplog.at_level("WARNING", logger="kitebus.kiteticker"):
        assert account_of("key-c") == "default"
    assert "matches no account in KITEBUS_ACCOUNTS" in caplog.text and "key-c" not in caplog.text
