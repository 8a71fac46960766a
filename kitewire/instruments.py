"""Kite's instruments dump (``https://api.kite.trade/instruments``), and symbols in requests.

A symbol is ``EXCHANGE:TRADINGSYMBOL`` as Kite writes it (``NSE:INFY``, ``NSE:NIFTY 50``,
``NFO:NIFTY25DECFUT``). Matching ignores case: symbols are kept upper-cased.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

COLUMNS = ("instrument_token", "exchange", "tradingsymbol")
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{0,15}:\S.{0,79}$")


class InstrumentsError(ValueError):
    """The text is not a usable Kite instruments dump."""


class UnknownInstrument(LookupError):
    """Symbols that are not in the loaded instruments; the message names them."""

    def __init__(self, symbols: Sequence[str], hint: str = "") -> None:
        self.symbols = tuple(symbols)
        names = ", ".join(self.symbols[:20]) + (" …" if len(self.symbols) > 20 else "")
        super().__init__(f"unknown instrument{'s' if len(self.symbols) > 1 else ''} {names}{hint}")


def normal_symbol(text: str) -> str:
    """``nse:infy`` -> ``NSE:INFY``; single spaces inside; raises ValueError if not a symbol."""
    symbol = " ".join(text.split()).upper()
    if not _SYMBOL.match(symbol):
        raise ValueError(f"bad symbol {text[:30]!r}: EXCHANGE:TRADINGSYMBOL, e.g. NSE:INFY")
    return symbol


def split_items(text: str) -> list[str]:
    """Tokens and symbols of a ``tokens`` field: separated by commas and/or spaces, except
    that words after a symbol, up to the next comma, belong to it (``NSE:NIFTY 50``)."""
    items: list[str] = []
    for part in text.split(","):
        symbol: list[str] = []
        for word in part.split():
            if ":" in word:
                if symbol:
                    items.append(" ".join(symbol))
                symbol = [word]
            elif symbol:
                symbol.append(word)
            else:
                items.append(word)
        if symbol:
            items.append(" ".join(symbol))
    return items


def parse_instruments(text: str, source: str = "instruments") -> tuple[dict[str, int], int]:
    """``EXCHANGE:TRADINGSYMBOL`` -> instrument token of every usable row, and how many rows
    were skipped (a bad token or symbol). A file without the columns or without a single
    usable row raises InstrumentsError."""
    reader = csv.DictReader(io.StringIO(text))
    missing = set(COLUMNS) - set(reader.fieldnames or ())
    if missing:
        columns = ", ".join(sorted(missing))
        raise InstrumentsError(f"{source}: not a Kite instruments dump (no column {columns})")
    by_symbol: dict[str, int] = {}
    bad = 0
    for row in reader:
        token_text = (row["instrument_token"] or "").strip()
        try:
            if row["exchange"] is None or row["tradingsymbol"] is None:
                raise ValueError  # a short row: a dump cut off in its middle
            symbol = normal_symbol(f"{row['exchange']}:{row['tradingsymbol']}")
            if not symbol.isprintable():
                raise ValueError
            token = int(token_text)
            if not (token_text.isascii() and token_text.isdigit() and 0 < token < 2**32):
                raise ValueError
        except (ValueError, TypeError):
            bad += 1
            continue
        by_symbol[symbol] = token
    if not by_symbol:
        raise InstrumentsError(f"{source}: no usable instrument in it ({bad} bad rows)")
    return by_symbol, bad


def write_csv(path: str | Path, rows: Iterable[tuple[int, str, str]]) -> None:
    """Write (token, exchange, tradingsymbol) rows in Kite's instruments format."""
    columns = ["instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
               "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for token, exchange, symbol in rows:
            writer.writerow([token, token >> 8, symbol, symbol, 0, "", 0, 0.05, 1, "EQ", exchange, exchange])
