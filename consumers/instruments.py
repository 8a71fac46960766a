"""Symbols (``EXCHANGE:TRADINGSYMBOL``) <-> tokens through ``{ns}:instruments``, the hash
the publisher loads from Kite's instruments dump: no file on the strategy's machine."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as redis

from config.keys import Keys
from kitewire.instruments import UnknownInstrument, normal_symbol, split_items

__all__ = ["UnknownInstrument", "names", "resolve", "split_items"]


async def resolve(client: redis.Redis, keys: Keys, items: Iterable[int | str]) -> list[int]:
    """Tokens (ints or digit strings) as given, ``EXCHANGE:SYMBOL`` looked up; order kept,
    duplicates dropped. Raises UnknownInstrument naming every unknown symbol, ValueError
    for an item that is neither."""
    parsed: list[int | str] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            parsed.append(item)
        elif isinstance(item, str) and item.strip().isascii() and item.strip().isdigit():
            parsed.append(int(item))
        elif isinstance(item, str) and ":" in item:
            parsed.append(normal_symbol(item))
        else:
            raise ValueError(f"bad token {str(item)[:30]!r}: an instrument token or EXCHANGE:SYMBOL")
    symbols = list(dict.fromkeys(p for p in parsed if isinstance(p, str)))
    found: dict[str, int] = {}
    if symbols:
        values = await client.hmget(keys.instruments, symbols)
        unknown = [s for s, v in zip(symbols, values, strict=True) if v is None]
        if unknown:
            empty = not await client.exists(keys.instruments)
            hint = " (no instruments in Redis: set KITEBUS_INSTRUMENTS for the publisher)" if empty else ""
            raise UnknownInstrument(unknown, hint)
        found = {s: int(v) for s, v in zip(symbols, values, strict=True)}
    tokens = [found[p] if isinstance(p, str) else p for p in parsed]
    return list(dict.fromkeys(tokens))


async def names(client: redis.Redis, keys: Keys, tokens: Iterable[int]) -> dict[int, str]:
    """``EXCHANGE:SYMBOL`` of each token the loaded instruments know."""
    wanted = list(dict.fromkeys(tokens))
    if not wanted:
        return {}
    values = await client.hmget(keys.instruments, [str(t) for t in wanted])
    return {t: v.decode() for t, v in zip(wanted, values, strict=True) if v is not None}
