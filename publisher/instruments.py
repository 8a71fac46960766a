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
import csv
import logging
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

from config.keys import Keys
from config.masking import mask_secrets
from kitewire.instruments import InstrumentsError, UnknownInstrument, parse_instruments
from publisher.health import Health
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.instruments")

MAX_BYTES = 256 << 20  # Kite's full dump is a few tens of MB (the cap holds after gunzip too)
TIMEOUT = 120.0  # seconds for a whole fetch and parse, however the source trickles
READ = 1 << 16  # bytes per read
CHUNK = 10_000  # fields per HSET
RETRY = 60.0  # seconds before a failed load is tried again


def _read(source: str, deadline: float, max_bytes: int = MAX_BYTES) -> str:
    """The dump's text (blocking: run it in a thread). Gives up once ``time.monotonic()``
    passes ``deadline`` or the text passes ``max_bytes``; a gzip file is unpacked."""
    parts: list[bytes] = []
    size = 0

    def take(read: Callable[[int], bytes]) -> None:
        nonlocal size
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InstrumentsError(f"{source}: not read within the time allowed")
            part = read(READ)
            if not part:
                return
            size += len(part)
            if size > max_bytes:
                raise InstrumentsError(f"{source}: larger than {max_bytes:,} bytes")
            parts.append(part)

    left = max(0.1, deadline - time.monotonic())
    if source.startswith(("http://", "https://")):
        request = urllib.request.Request(source, headers={"User-Agent": "kitebus"})
        # The socket's timeout bounds each wait for a byte; ``take`` bounds the whole.
        with urllib.request.urlopen(request, timeout=min(left, 30.0)) as response:
            take(response.read1)  # what has arrived: a trickle cannot hold one read for long
            if response.length:  # read1 takes an early end quietly, read() would not
                raise InstrumentsError(f"{source}: truncated ({response.length:,} bytes missing)")
    else:
        with Path(source).open("rb", buffering=0) as handle:
            take(handle.read)
    data = b"".join(parts)
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(source, data, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InstrumentsError(f"{source}: not UTF-8 text") from None


def _gunzip(source: str, data: bytes, max_bytes: int) -> bytes:
    unpacker = zlib.decompressobj(wbits=31)
    try:
        text = unpacker.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise InstrumentsError(f"{source}: broken gzip ({exc})") from None
    if len(text) > max_bytes:
        raise InstrumentsError(f"{source}: larger than {max_bytes:,} bytes unpacked")
    if not unpacker.eof:
        raise InstrumentsError(f"{source}: truncated gzip")
    return text


def _fetch(source: str, deadline: float, max_bytes: int) -> tuple[dict[str, int], int]:
    """Read and parse (blocking: in a thread, so a big dump does not stall the event loop
    and Kite's connections with it)."""
    text = _read(source, deadline, max_bytes)
    if time.monotonic() > deadline:
        raise InstrumentsError(f"{source}: not read within the time allowed")
    try:
        return parse_instruments(text, source)
    except csv.Error as exc:  # a line over csv's field limit (an error page), a NUL byte, …
        raise InstrumentsError(f"{source}: not a Kite instruments dump (csv: {exc})") from None


class InstrumentsLoader:
    """Owns the refresh task; ``resolve`` turns symbols into tokens for control requests.

    A load never raises for its source: whatever is wrong with it (missing, refused,
    malformed, truncated, over ``max_bytes``, slower than ``timeout`` seconds in all) is
    logged and kept in ``error`` (``instruments_error`` in ``{ns}:status``, masked), and
    the last good hash stays. Only Redis errors are raised."""

    def __init__(
        self, client: bus.Client, keys: Keys, source: str | None, *, refresh: float = 86_400.0,
        timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES,
    ) -> None:  # fmt: skip
        self._redis = client
        self._keys = keys
        self.source = source
        self.refresh = refresh
        self.timeout = timeout
        self.max_bytes = max_bytes
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
        source = self.source
        # The thread gives up by itself at the deadline; the wait here is bounded too,
        # should the thread be stuck where it cannot look at the clock (a FIFO's open).
        timer = asyncio.timeout(self.timeout + 1.0)
        try:
            async with timer:
                by_symbol, skipped = await asyncio.to_thread(
                    _fetch, source, time.monotonic() + self.timeout, self.max_bytes
                )
        except InstrumentsError as exc:
            return self._failed(str(exc).replace("the time allowed", f"{self.timeout:g}s"))
        except (OSError, ValueError) as exc:  # a missing file, a refused URL, a bad URL
            if timer.expired():
                return self._failed(f"{source}: not read within {self.timeout:g}s")
            return self._failed(f"{source}: {exc}")
        except Exception as exc:  # whatever else a source can do: never the publisher's end
            log.exception("instruments: unexpected failure reading the source")
            return self._failed(f"{source}: {exc.__class__.__name__}: {exc}")
        await self._write(by_symbol)
        self.count, self.loaded_at, self.error = len(by_symbol), time.time(), ""
        log.info("instruments loaded symbols=%d skipped_rows=%d", len(by_symbol), skipped)
        return True

    def _failed(self, error: str) -> bool:
        self.error = mask_secrets(error)[:300]  # a URL's password or access_token never shows
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
            # anything else is a bug here (a source's failures are load's to report): the
            # supervisor restarts the task and shows it, as for every task
