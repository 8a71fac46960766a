"""Kite's instruments dump and symbols in a tokens field: pure parsing."""

from __future__ import annotations

import pytest

from kitewire.instruments import InstrumentsError, normal_symbol, parse_instruments, split_items
from publisher.requests import Request, RequestError, parse_request
from tests.integration.conftest import INSTRUMENTS_CSV

HEADER = "instrument_token,exchange_token,tradingsymbol,name,exchange\n"


def test_the_test_dump_parses_with_symbols_kite_writes() -> None:
    by_symbol, skipped = parse_instruments(INSTRUMENTS_CSV.read_text(), "test data")
    assert skipped == 0
    assert by_symbol["NSE:INFY"] == 408065 and by_symbol["NSE:NIFTY 50"] == 256265
    assert by_symbol["NSE:M&M"] == 519937 and by_symbol["NSE:BAJAJ-AUTO"] == 4267265


def test_bad_rows_are_skipped_and_counted() -> None:
    text = HEADER + "408065,1,INFY,,NSE\nabc,1,BAD,,NSE\n0,1,ZERO,,NSE\n5,1,,,NSE\n99999999999,1,BIG,,NSE\n"
    assert parse_instruments(text) == ({"NSE:INFY": 408065}, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a Kite instruments dump"),
        ("token,symbol\n1,INFY\n", "no column exchange, instrument_token, tradingsymbol"),
        (HEADER, "no usable instrument"),
        (HEADER + "x,1,INFY,,NSE\n", r"no usable instrument in it \(1 bad rows\)"),
    ],
)
def test_an_unusable_dump_is_refused(text: str, message: str) -> None:
    with pytest.raises(InstrumentsError, match=message):
        parse_instruments(text, "dump.csv")


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("408065,884737", ["408065", "884737"]),
        (" 1, 2  3,,4 ", ["1", "2", "3", "4"]),
        ("NSE:INFY NSE:TCS", ["NSE:INFY", "NSE:TCS"]),
        ("NSE:NIFTY 50,NSE:INFY", ["NSE:NIFTY 50", "NSE:INFY"]),
        ("408065 NSE:NIFTY  BANK, 5", ["408065", "NSE:NIFTY BANK", "5"]),
    ],
)
def test_split_items(text: str, items: list[str]) -> None:
    assert split_items(text) == items


def test_symbols_are_matched_without_case() -> None:
    assert normal_symbol(" nse:nifty   50 ") == "NSE:NIFTY 50"
    for bad in ("NSE:", ":INFY", "N SE:INFY", "1NSE:INFY"):
        with pytest.raises(ValueError, match="bad symbol"):
            normal_symbol(bad)


def test_a_request_carries_symbols_for_the_publisher_to_resolve() -> None:
    request = parse_request({"op": "subscribe", "tokens": "408065, nse:nifty 50, NSE:INFY", "mode": "ltp"})
    assert request.tokens == (408065,) and request.symbols == ("NSE:NIFTY 50", "NSE:INFY")
    assert request.resolved((256265, 408065)) == Request("subscribe", (408065, 256265), "default", "ltp")
    with pytest.raises(RequestError, match="bad symbol"):
        parse_request({"op": "subscribe", "tokens": "NSE:"})


def test_a_dump_cut_off_in_a_row_does_not_make_up_a_symbol() -> None:
    text = HEADER + '408065,1,INFY,,NSE\n5,1,"TC'  # the last row ends before its exchange
    assert parse_instruments(text) == ({"NSE:INFY": 408065}, 1)
    assert parse_instruments(HEADER + "408065,1,INFY,,NSE\n7,1,IN\x00FY,,NSE\n") == ({"NSE:INFY": 408065}, 1)
