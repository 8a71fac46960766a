"""Kite's instruments dump into ``{ns}:instruments``, and symbols resolved from it.

The source (``KITEBUS_INSTRUMENTS``: a path, or an http(s) URL such as Kite's own
``https://api.kite.trade/instruments``) is read at start, again every ``refresh`` seconds
(Kite publishes a new dump every morning) and whenever Redis comes back without its
data. The hash holds both directions: ``EXCHANGE:TRADINGSYMBOL`` -> token and token ->
symbol. It is updated in place: new and changed pairs first, then the pairs gone from
the dump are removed, so a reader never finds a symbol missing that is in both the old
and the new dump (a temporary key renamed into place would not work on a Redis Cluster,
where the two names sit in different slots). A source that cannot be read or parsed is reported (log, status)
and the last good hash stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from pathlib import Path

from config.keys import Keys
from kitewire.instruments import InstrumentsError, UnknownInstrument, parse_instruments
from publisher import bus
from publisher.bus import REDIS_FAULTS
from publisher.health import Health
from publisher.tasks import cancel_and_wait, supervised

log = logging.getLogger("kitebus.instruments")

MAX_BYTES = 256 << 20  # Kite's full dump is a few tens of MB
CHUNK = 10_000  # fields per HSET
RETRY = 60.0  # seconds before a failed load is tried again


def _read(source: str) -> str:
    """The dump's text (blocking: run it in a thread)."""
    if source.startswith(("http://", "https://")):
        request = urllib.request.Request(source, headers={"User-Agent": "kitebus"})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read(MAX_BYTES + 1)
    else:
        with Path(source).open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise InstrumentsError(f"{source}: larger than {MAX_BYTES >> 20} MB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InstrumentsError(f"{source}: not UTF-8 text") from None


class InstrumentsLoader:
    """Owns the refresh task; ``resolve`` turns symbols into tokens for control requests."""

    def __init__(
        self, client: bus.Client, keys: Keys, source: str | None, *, refresh: float = 86_400.0
    ) -> None:
        self._redis = client
        self._keys = keys
        self.source = source
        self.refresh = refresh
        self.count = 0  # symbols in the last good load
        self.loaded_at = 0.0
        self.error = ""
        self._wake = asyncio.Event()
        self.health = Health()  # the publisher's, once it is given one
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> bool:
        """Read, parse and write the dump once; False (and ``error`` set) if the source
        failed. Redis errors are raised."""
        if not self.source:
            return False
        try:
            text = await asyncio.to_thread(_read, self.source)
            by_symbol, skipped = parse_instruments(text, self.source)
        except InstrumentsError as exc:
            return self._failed(str(exc))
        except (OSError, ValueError) as exc:  # a missing file, a refused URL, a bad URL
            return self._failed(f"{self.source}: {exc}")
        await self._write(by_symbol)
        self.count, self.loaded_at, self.error = len(by_symbol), time.time(), ""
        log.info("instruments loaded symbols=%d skipped_rows=%d", len(by_symbol), skipped)
        return True

    def _failed(self, error: str) -> bool:
        self.error = error[:300]
        log.error("instruments not loaded (the last good ones stay in use) error=%r", self.error)
        return False

    async def _write(self, by_symbol: dict[str, int]) -> None:
        key = self._keys.instruments
        fresh: dict[str, str] = {}
        for symbol, token in by_symbol.items():
            fresh[symbol] = str(token)
            fresh[str(token)] = symbol
        items = list(fresh.items())
        for start in range(0, len(items), CHUNK):
            await self._redis.hset(key, mapping=dict(items[start : start + CHUNK]))
        names = await self._redis.hkeys(key)
        stale = [name for name in names if name.decode("utf-8", "replace") not in fresh]
        for start in range(0, len(stale), CHUNK):
            await self._redis.hdel(key, *stale[start : start + CHUNK])

    async def resolve(self, symbols: tuple[str, ...]) -> tuple[int, ...]:
        """The tokens of these (normalised) symbols; raises UnknownInstrument naming the
        unknown ones."""
        found = await self._redis.hmget(self._keys.instruments, list(symbols))
        unknown = [s for s, token in zip(symbols, found, strict=True) if token is None]
        if unknown:
            hint = "" if self.count or self.source else " (no instruments loaded: set KITEBUS_INSTRUMENTS)"
            if any(" " in s for s in unknown):
                hint += " (separate a symbol from what follows it with a comma)"
            raise UnknownInstrument(unknown, hint)
        return tuple(int(token) for token in found)

    # --- the refresh task ----------------------------------------------------------------

    def reload(self) -> None:
        """Load again now (Redis came back without its data)."""
        self._wake.set()

    def start(self) -> None:
        if self.source:
            supervisor = supervised("instruments", self._run, self.health)
            self._task = asyncio.create_task(supervisor, name="instruments")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        """Load again every ``refresh`` seconds (every minute after a failure), or when woken."""
        while True:
            try:
                async with asyncio.timeout(RETRY if self.error else self.refresh):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.load()
            except REDIS_FAULTS as exc:  # loaded again when Redis is back (``reload``), or in a minute
                self._failed(bus.describe(exc))
