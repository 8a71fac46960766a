"""Ticks from the bus to Parquet files: ``kitebus record DIR [TOKENS…]`` (docs/history.md).

Layout: ``DIR/YYYY-MM-DD/`` per IST day. Every flush interval the buffered rows become a
closed part file ``ticks-HHMMSS-NNNN.parquet`` (HHMMSS: the IST start of its roll window),
written as ``….tmp`` and renamed, so a SIGKILL loses at most the rows not yet flushed and
every file with a final name is whole. When a roll window is over its parts are compacted
into ``ticks-HHMMSS.parquet`` (rename first, then the parts are removed: a reader that finds
both takes the compacted file). Holes go to ``events-…`` files beside them, the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from consumers.subscriber import StreamStatus, Tick, TickSubscriber

log = logging.getLogger("kitebus.recorder")
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))

_LEVEL = pa.struct([("quantity", pa.int64()), ("price", pa.float64()), ("orders", pa.int64())])
TICK_SCHEMA = pa.schema([
    ("instrument_token", pa.int64()),
    ("mode", pa.string()),
    ("tradable", pa.bool_()),
    ("last_price", pa.float64()),
    ("received_at_ns", pa.int64()),
    ("seq", pa.int64()),
    ("epoch", pa.int64()),
    ("last_traded_quantity", pa.int64()),
    ("average_traded_price", pa.float64()),
    ("volume_traded", pa.int64()),
    ("total_buy_quantity", pa.int64()),
    ("total_sell_quantity", pa.int64()),
    ("ohlc", pa.struct([(k, pa.float64()) for k in ("open", "high", "low", "close")])),
    ("change", pa.float64()),
    ("last_trade_time", pa.int64()),
    ("oi", pa.int64()),
    ("oi_day_high", pa.int64()),
    ("oi_day_low", pa.int64()),
    ("exchange_timestamp", pa.int64()),
    ("depth", pa.struct([("buy", pa.list_(_LEVEL)), ("sell", pa.list_(_LEVEL))])),
    ("recorded_at_ns", pa.int64()),  # the recorder's receive time, time.time_ns()
])  # fmt: skip
EVENT_SCHEMA = pa.schema([
    ("kind", pa.string()),  # gap, epoch, stale, live, cut, start, stop
    ("token", pa.int64()),
    ("from_seq", pa.int64()),
    ("to_seq", pa.int64()),
    ("at", pa.int64()),  # time.time_ns() when the recorder saw it
    ("reason", pa.string()),
])  # fmt: skip
_NAME = re.compile(r"^(ticks|events)-(\d{6})(?:-(\d{4,}))?\.parquet$")


@dataclass
class RecorderStats:
    ticks: int = 0
    events: int = 0
    files: int = 0


class DiskFull(OSError):
    """A write failed for lack of space (or any OSError): the recorder stops, keeping its files."""


@dataclass
class ParquetSink:
    """Buffered rows and the files they go to. Pure file work: no Redis in here."""

    root: Path
    roll_seconds: float = 300.0
    ticks: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    stats: RecorderStats = field(default_factory=RecorderStats)
    _parts: dict[tuple[str, str], int] = field(default_factory=dict)  # (day, window) -> next part number

    def window(self, now_ns: int) -> tuple[str, str]:
        """(IST day, IST start of the roll window) of a time."""
        moment = dt.datetime.fromtimestamp(now_ns / 1e9, IST)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        offset = (moment - midnight).total_seconds()
        start = midnight + dt.timedelta(seconds=offset - offset % self.roll_seconds)
        return moment.strftime("%Y-%m-%d"), start.strftime("%H%M%S")

    def event(self, kind: str, token: int | None = None, from_seq: int | None = None,
              to_seq: int | None = None, reason: str = "") -> None:  # fmt: skip
        self.events.append({"kind": kind, "token": token, "from_seq": from_seq, "to_seq": to_seq,
                            "at": time.time_ns(), "reason": reason})  # fmt: skip

    def flush(self, now_ns: int | None = None) -> None:
        """Write what is buffered as closed part files, then compact windows that are over."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        day, window = self.window(now_ns)
        if self.ticks or self.events:
            directory = self.root / day
            directory.mkdir(parents=True, exist_ok=True)
            number = self._parts.get((day, window)) or _next_part(directory, window)
            self._parts[(day, window)] = number + 1
            if self.ticks:
                _write(directory / f"ticks-{window}-{number:04d}.parquet", self.ticks, TICK_SCHEMA)
                self.stats.files += 1
            if self.events:
                _write(directory / f"events-{window}-{number:04d}.parquet", self.events, EVENT_SCHEMA)
                self.stats.files += 1
            self.stats.ticks += len(self.ticks)
            self.stats.events += len(self.events)
            self.ticks, self.events = [], []
        self.compact(before=(day, window))

    def compact(self, before: tuple[str, str] | None = None) -> None:
        """Merge the parts of every window earlier than ``before`` (all with None) into one
        file per window and table; parts of a window already compacted are leftovers of a
        compaction cut short, and go."""
        if not self.root.is_dir():
            return
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            groups: dict[tuple[str, str], list[Path]] = {}
            for path in directory.iterdir():
                match = _NAME.match(path.name)
                if match and match.group(3) and (before is None or (directory.name, match.group(2)) < before):
                    groups.setdefault((match.group(1), match.group(2)), []).append(path)
            for (table, window), parts in sorted(groups.items()):
                target = directory / f"{table}-{window}.parquet"
                if not target.exists():
                    schema = TICK_SCHEMA if table == "ticks" else EVENT_SCHEMA
                    try:
                        tables = [pq.read_table(p, schema=schema) for p in sorted(parts)]
                    except (pa.ArrowException, OSError) as exc:  # not ours, or damaged: leave them be
                        log.warning("not compacting %s/%s-%s-*: %s", directory, table, window, exc)
                        continue
                    _write_table(target, pa.concat_tables(tables))
                for part in parts:
                    part.unlink()
                self._parts.pop((directory.name, window), None)


def _next_part(directory: Path, window: str) -> int:
    """The next free part number of a window (a restarted recorder continues after its parts)."""
    numbers = [int(m.group(3)) for p in directory.iterdir()
               if (m := _NAME.match(p.name)) and m.group(2) == window and m.group(3)]  # fmt: skip
    return max(numbers, default=0) + 1


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    _write_table(path, pa.Table.from_pylist(rows, schema=schema))


def _write_table(path: Path, table: pa.Table) -> None:
    """Write to ``path.tmp``, fsync, rename: a file with the final name is always whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            pq.write_table(table, out, compression="zstd")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DiskFull(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


def check_writable(root: Path) -> None:
    """Create ``root`` if missing and prove a file can be written there (raises OSError)."""
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".kitebus-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


class Recorder:
    """Reads ticks through a TickSubscriber and feeds a ParquetSink, noting holes as events."""

    def __init__(self, sink: ParquetSink, flush_seconds: float = 2.0, follow_seconds: float = 1.0) -> None:
        self.sink = sink
        self.flush_seconds = flush_seconds
        self.follow_seconds = follow_seconds
        self._last: dict[int, tuple[int, int]] = {}  # token -> (epoch, seq) of the newest tick
        self._reconnects = 0

    def on_status(self, event: StreamStatus) -> None:
        for token in event.tokens:
            self.sink.event(event.status, token, reason=event.reason or f"connection {event.connection}")

    def take(self, tick: Tick, recorded_at_ns: int) -> None:
        token, seq, epoch = tick["instrument_token"], tick.get("seq"), tick.get("epoch")
        if seq is not None:
            last = self._last.get(token)
            if last is not None and last[0] != epoch:
                self.sink.event("epoch", token, last[1], seq, f"publisher epoch {last[0]} -> {epoch}")
            elif last is not None and seq > last[1] + 1:
                self.sink.event("gap", token, last[1] + 1, seq - 1, "seq numbers never received")
            elif last is not None and seq <= last[1] and seq > 1:  # the subscriber passes no duplicates
                self.sink.event("gap", token, 1, seq - 1, "seq started again (released, claimed again)")
            self._last[token] = (epoch, seq)
        self.sink.ticks.append({**tick, "recorded_at_ns": recorded_at_ns})

    async def run(self, sub: TickSubscriber, tokens: list[int] | None, stop: asyncio.Event) -> None:
        """Record until ``stop``; ``tokens`` None: every token in ``{ns}:token_conn``, followed."""
        self.sink.event("start", reason=f"pid {os.getpid()}")
        if tokens is not None:
            await self._listen(sub, tokens)
        next_flush = next_follow = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if tokens is None and now >= next_follow:
                    await self._follow(sub)
                    next_follow = now + self.follow_seconds
                wait = max(0.0, min(next_flush, next_follow if tokens is None else next_flush) - now)
                batch = await sub.batch(5000, wait=min(wait, 0.2))
                recorded = time.time_ns()
                for tick in batch:
                    self.take(tick, recorded)
                if sub.reconnects != self._reconnects:
                    self._reconnects = sub.reconnects
                    reason = f"cut off by Redis; reconnected (missed so far {sub.missed})"
                    self.sink.event("cut", reason=reason)
                if time.monotonic() >= next_flush:
                    self.sink.flush()
                    next_flush = time.monotonic() + self.flush_seconds
        finally:
            self.sink.event("stop", reason="stopped")
            self.sink.flush()

    async def _follow(self, sub: TickSubscriber) -> None:
        carried = {int(t) for t in await sub._redis.hkeys(sub.keys.token_conn)}  # type: ignore[union-attr]
        new = sorted(carried - sub.listened)
        if new:
            await self._listen(sub, new)
            log.info("recorder: now recording tokens=%d (+%d)", len(sub.listened), len(new))

    async def _listen(self, sub: TickSubscriber, tokens: list[int]) -> None:
        """Listen, and note the tokens already stale (on_status tells only changes)."""
        await sub.listen(tokens)
        for token in tokens:
            if sub.status.get(token) == "stale":
                self.sink.event("stale", token, reason="stale when the recorder began listening")


def _files(root: Path, table: str) -> list[Path]:
    """The final-named files of a table, in recorded order, parts a compaction covers left out."""
    found: list[Path] = []
    for directory in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        names = {p.name: p for p in directory.iterdir() if p.name.endswith(".parquet")}
        for name in sorted(names):
            match = _NAME.match(name)
            if match is None:
                if name.startswith(f"{table}-"):
                    warnings.warn(f"kitebus: skipping {names[name]}: not a recorder file name", stacklevel=3)
                continue
            if match.group(1) != table:
                continue
            if match.group(3) and f"{table}-{match.group(2)}.parquet" in names:
                continue  # a compaction finished before these parts were removed
            found.append(names[name])
    return found


def _read(root: Path, table: str, schema: pa.Schema) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in _files(root, table):
        try:
            data = pq.read_table(path)
            if not set(schema.names) <= set(data.schema.names):
                raise ValueError("columns are not the recorder's")
            data = data.select(schema.names).cast(schema)
        except (pa.ArrowException, OSError, ValueError) as exc:
            warnings.warn(f"kitebus: skipping {path}: {exc}", stacklevel=3)
            log.warning("skipping %s: %s", path, exc)
            continue
        rows.extend(data.to_pylist())
    return rows


def _ns(moment: dt.datetime | int | None) -> int | None:
    if moment is None or isinstance(moment, int):
        return moment
    return int(moment.timestamp() * 1e9)


def read_recording(root: str | os.PathLike[str], start: dt.datetime | int | None = None,
                   end: dt.datetime | int | None = None) -> list[Tick]:  # fmt: skip
    """The recorded ticks in recorded order, as the payload's dicts (absent fields left out)
    plus ``recorded_at_ns``; ``start``/``end`` (datetime or epoch ns) bound the recorder's
    receive time, end excluded. Foreign or corrupt Parquet files are skipped with a warning."""
    lo, hi = _ns(start), _ns(end)
    ticks = []
    for row in _read(Path(root), "ticks", TICK_SCHEMA):
        at = row["recorded_at_ns"]
        if (lo is None or at >= lo) and (hi is None or at < hi):
            ticks.append({k: v for k, v in row.items() if v is not None})
    return ticks


def read_events(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The recorded events (holes, stream status, the recorder's own cuts), in order."""
    return _read(Path(root), "events", EVENT_SCHEMA)
