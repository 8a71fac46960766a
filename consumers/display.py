"""Ticks as text: one line per tick (``kitebus tail``) and a watchlist table (the demo)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from kitewire.codec import divisor_of

if TYPE_CHECKING:
    from consumers.orders import OrderUpdate


def format_tick(tick: Mapping[str, Any], symbol: str | None = None) -> str:
    """``14:02:11.204 INFY(408065) full 1560.05 +0.12% vol 12,345 bid 1560.00x120 ask 1560.10x80``"""
    received = tick.get("received_at_ns", 0) / 1e9
    clock = time.strftime("%H:%M:%S", time.localtime(received)) + f".{int(received * 1000) % 1000:03d}"
    name = f"{symbol}({tick['instrument_token']})" if symbol else str(tick["instrument_token"])
    parts = [clock, name, tick["mode"], f"{tick['last_price']:.{_decimals(tick['instrument_token'])}f}"]
    if "change" in tick:
        parts.append(f"{tick['change']:+.2f}%")
    if "volume_traded" in tick:
        parts.append(f"vol {tick['volume_traded']:,}")
    if "depth" in tick:
        bid, ask = tick["depth"]["buy"][0], tick["depth"]["sell"][0]
        parts.append(f"bid {bid['price']:.2f}x{bid['quantity']} ask {ask['price']:.2f}x{ask['quantity']}")
    return " ".join(parts)


def _decimals(token: int) -> int:
    return 2 if divisor_of(token) == 100 else 4


def watchlist_table(
    latest: Mapping[int, Mapping[str, Any]],
    symbols: Mapping[int, str],
    placement: Mapping[int, int],
    modes: Mapping[int, str],
    status: Mapping[int, str] | None = None,
) -> Table:
    """Latest price per instrument, in the order of ``symbols``, with its stream status."""
    status = status or {}
    table = Table(title="watchlist", title_justify="left")
    for column in ("symbol", "token", "ltp", "chg %", "volume", "mode", "conn", "age", "stream"):
        table.add_column(column, justify="left" if column in ("symbol", "mode") else "right")
    now = time.time_ns()
    for token, symbol in symbols.items():
        tick = latest.get(token)
        if tick is None:
            table.add_row(
                symbol, str(token), "…", "", "", modes.get(token, ""), str(placement.get(token, "")), "",
                _stream(status.get(token)),
            )  # fmt: skip
            continue
        change = tick.get("change")
        style = "green" if change and change > 0 else "red" if change and change < 0 else ""
        table.add_row(
            symbol, str(token), f"{tick['last_price']:,.{_decimals(token)}f}",
            Text(f"{change:+.2f}", style=style) if change is not None else "",
            f"{tick['volume_traded']:,}" if "volume_traded" in tick else "",
            modes.get(token, tick["mode"]), str(placement.get(token, "")),
            f"{(now - tick['received_at_ns']) / 1e9:.1f}s", _stream(status.get(token)),
        )  # fmt: skip
    return table


def _stream(status: str | None) -> Text:
    return Text(status or "", style="green" if status == "live" else "bold red")


def format_status(status: str, tokens: Iterable[int], reason: str, symbols: Mapping[int, str]) -> str:
    """One line for a stream status change, as ``kitebus tail`` prints it."""
    names = ", ".join(symbols.get(t, str(t)) for t in tokens)
    return f"# {status.upper()}: {names}" + (f" ({reason})" if reason else "")


def format_order(update: OrderUpdate) -> str:
    """``14:02:11.204 ORDER [default] 251128000000042 UPDATE BUY SBIN 4/10 @ 960.50 (1764330131204-0)``"""
    data = update.data
    ms = int(update.id.partition("-")[0] or 0)
    clock = time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"
    parts = [clock, "ORDER", f"[{update.account}]", update.order_id, update.status or "?"]
    for key in ("transaction_type", "tradingsymbol"):
        if data.get(key):
            parts.append(str(data[key]))
    if "quantity" in data:
        parts.append(f"{data.get('filled_quantity', 0)}/{data['quantity']}")
    price = data.get("average_price") or data.get("price")
    if isinstance(price, int | float) and price:
        parts.append(f"@ {price:.2f}")
    if data.get("status_message"):
        parts.append(repr(str(data["status_message"])[:80]))
    parts.append(f"({update.id})")
    return " ".join(parts)


def orders_table(updates: Iterable[OrderUpdate]) -> Table:
    """The latest order updates, newest first (the demo)."""
    table = Table(title="order updates (latest first)", title_justify="left")
    for column in ("time", "account", "order_id", "status", "side", "symbol", "filled", "price"):
        table.add_column(column, justify="right" if column in ("filled", "price") else "left")
    for update in reversed(list(updates)):
        data = update.data
        ms = int(update.id.partition("-")[0] or 0)
        price = data.get("average_price") or data.get("price") or 0
        filled = f"{data.get('filled_quantity', 0)}/{data.get('quantity', '?')}"
        style = {"COMPLETE": "green", "REJECTED": "bold red", "CANCELLED": "yellow"}.get(update.status, "")
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(ms / 1000)), update.account, update.order_id,
            Text(update.status, style=style), str(data.get("transaction_type", "")),
            str(data.get("tradingsymbol", "")), filled,
            f"{price:,.2f}" if isinstance(price, int | float) else str(price),
        )  # fmt: skip
    return table
