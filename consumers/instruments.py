"""Instrument symbols (``EXCHANGE:TRADINGSYMBOL``) -> tokens, from Kite's instruments CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path


class UnknownInstrument(LookupError):
    """A symbol is not in the instruments file (or no file is configured)."""


class Instruments:
    """The ``instrument_token``, ``exchange`` and ``tradingsymbol`` columns of Kite's
    instruments dump (``https://api.kite.trade/instruments``)."""

    def __init__(self, by_symbol: dict[str, int]) -> None:
        self._by_symbol = by_symbol
        self.symbols = {token: symbol for symbol, token in by_symbol.items()}

    @classmethod
    def from_csv(cls, path: str | Path) -> Instruments:
        by_symbol: dict[str, int] = {}
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"instrument_token", "exchange", "tradingsymbol"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: not a Kite instruments file (no column {', '.join(sorted(missing))})"
                )
            for row in reader:
                by_symbol[f"{row['exchange']}:{row['tradingsymbol']}"] = int(row["instrument_token"])
        return cls(by_symbol)

    def token(self, symbol: str) -> int:
        try:
            return self._by_symbol[symbol]
        except KeyError:
            raise UnknownInstrument(f"unknown instrument {symbol!r}") from None


def resolve(items: Iterable[int | str], instruments: Instruments | None) -> list[int]:
    """Tokens as given (ints or digit strings) or ``EXCHANGE:SYMBOL`` through ``instruments``."""
    tokens = []
    for item in items:
        if isinstance(item, int) or str(item).isdigit():
            tokens.append(int(item))
        elif instruments is None:
            raise UnknownInstrument(
                f"{item!r} is a symbol, but no instruments file is configured (KITEBUS_INSTRUMENTS)"
            )
        else:
            tokens.append(instruments.token(str(item)))
    return tokens


def write_csv(path: str | Path, rows: Iterable[tuple[int, str, str]]) -> None:
    """Write (token, exchange, tradingsymbol) rows in Kite's instruments format."""
    columns = ["instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
               "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for token, exchange, symbol in rows:
            writer.writerow([token, token >> 8, symbol, symbol, 0, "", 0, 0.05, 1, "EQ", exchange, exchange])
