"""``kitebus replay DIR``: a recording played back over Kite's wire into a publisher of its own.

The simulator (``TickerServer``) is held still (no ticks of its own) and a ``Publisher`` in
namespace ``replay`` (by default) connects to it as it would to Kite. Strategies, the
library and the ``KiteTicker`` drop-in claim tokens there as on the live bus; the replay
sends each recorded tick to the simulator session that subscribed its token, as a packet
of the mode in force (never richer than the mode recorded), so only claimed tokens tick.

Recorded holes come back as holes: a token's ``stale`` to ``live`` period in the events
drops the session that carries it and refuses its reconnection for that long (scaled),
so the publisher marks it stale and live again on ``{ns}:stream_status``. Ticks meant for a
token whose session is down wait for its new session and go out in order: the same
subscriptions get the same ticks in the same order every time (docs/history.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from config import Keys, Settings
from consumers.control import ControlClient
from consumers.recorder import IST, read_events, read_recording
from kitewire import codec
from kitewire.instruments import write_csv
from publisher.app import Publisher
from publisher.lease import Lease
from rediswire import bus
from simulator.market import BY_TOKEN
from simulator.server import DEFAULT_ACCESS_TOKEN, DEFAULT_API_KEY, PACKETS_PER_FRAME, Session, TickerServer

log = logging.getLogger("kitebus.replay")
Tick = dict[str, Any]
POLL = 0.02  # seconds between looks at the simulator's sessions while waiting
STANDSTILL = 10.0  # seconds without a sent tick reaching the publisher that end a wait for them


class EmptyWindow(ValueError):
    """The recording holds no tick in the window asked for."""


class NamespaceTaken(RuntimeError):
    """Another publisher leads the namespace the replay was to use."""


@dataclass(frozen=True)
class Hole:
    """A stale period of some tokens in the recording: recorder times in ns."""

    start: int
    end: int
    tokens: frozenset[int]


@dataclass
class ReplayReport:
    """What a replay did."""

    recorded: int = 0  # ticks in the window
    sent: int = 0  # packets sent to the simulator's sessions
    skipped: int = 0  # ticks of tokens nobody claimed when their time came
    holes: int = 0
    given_up: int = 0  # ticks the replay's publisher conflated or dropped (0 unless Redis failed)
    unarrived: int = 0  # ticks sent that a cut connection lost before the publisher read them
    seconds: float = 0.0  # from the first tick sent to the last one published
    tokens: set[int] = field(default_factory=set)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def parse_speed(text: str) -> float | None:
    """``--speed``: a factor over recorded time (2 = twice as fast), or ``max`` (None)."""
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        raise ValueError(f"--speed must be a number or 'max', not {text!r}") from None
    if not 0 < speed < float("inf"):
        raise ValueError(f"--speed must be above 0, not {text!r}")
    return speed


def parse_clock(text: str) -> dt.time:
    """``--from`` / ``--to``: an IST time of day, HH:MM (or HH:MM:SS)."""
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a time of day (HH:MM): {text!r}") from None


def in_window(ticks: Iterable[Tick], since: dt.time | None, until: dt.time | None) -> list[Tick]:
    """The ticks recorded (IST clock) at or after ``since`` and before ``until``."""

    def clock(tick: Tick) -> dt.time:
        return _ist(tick["recorded_at_ns"]).time()

    return [t for t in ticks if (since is None or clock(t) >= since) and (until is None or clock(t) < until)]


def _ist(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, IST)


def holes_of(events: Sequence[dict[str, Any]], start: int, end: int) -> list[Hole]:
    """Each token's ``stale`` to next ``live`` period (or to ``end``) that overlaps the
    window, tokens of the same period together, in order of their start."""
    stale_since: dict[int, int] = {}
    spans: dict[tuple[int, int], set[int]] = {}
    for event in sorted(events, key=lambda e: e["at"] or 0):
        token, at = event["token"], event["at"]
        if token is None or at is None:
            continue
        if event["kind"] == "stale":
            stale_since.setdefault(token, at)
        elif event["kind"] == "live" and token in stale_since:
            spans.setdefault((stale_since.pop(token), at), set()).add(token)
    for token, since in stale_since.items():
        spans.setdefault((since, end), set()).add(token)
    return [
        Hole(max(lo, start), min(hi, end), frozenset(tokens))
        for (lo, hi), tokens in sorted(spans.items())
        if hi > start and lo < end
    ]


# the exchange of a token's segment (its low byte); an index is listed under NSE, as Kite lists it
_EXCHANGES = {number: name.upper() for name, number in codec.SEGMENTS.items() if name != "indices"}


def instruments_for(tokens: Iterable[int], path: Path) -> None:
    """An instruments file for the replay's publisher: the simulator's symbols where it knows
    the token, else the token's number as its symbol, on the exchange its segment names."""
    rows = []
    for token in sorted(tokens):
        known = BY_TOKEN.get(token)
        if known is not None:
            rows.append((token, known.exchange, known.symbol))
        else:
            rows.append((token, _EXCHANGES.get(token & 0xFF, "NSE"), str(token)))
    write_csv(path, rows)


class Replay:
    """Plays ``ticks`` (recorded order) through a simulator into a publisher (module doc)."""

    def __init__(
        self, settings: Settings, ticks: list[Tick], holes: list[Hole], *, speed: float | None,
        subscribe: bool = False, exit_at_end: bool = False,
    ) -> None:  # fmt: skip
        """``speed``: times recorded speed, None as fast as the stack takes; ``subscribe``: claim
        every recorded token (client ``replay``, in its richest recorded mode) and start at
        once, rather than wait for a strategy's first claim; ``exit_at_end``: stop once the last
        tick is published, rather than serve on (strategies' requests answered) until ``stop``."""
        self.settings = settings
        self.ticks = ticks
        self.holes = holes
        self.speed = speed
        self.subscribe = subscribe
        self.exit_at_end = exit_at_end
        self.report = ReplayReport(recorded=len(ticks), tokens={t["instrument_token"] for t in ticks})
        self.server: TickerServer | None = None
        self.publisher: Publisher | None = None
        self.ready = asyncio.Event()  # the publisher leads: strategies may claim now
        self.done = asyncio.Event()  # the last tick is published
        self._held: list[Tick] = []  # ticks of claimed tokens whose session is down, in order
        self._handed = 0  # the sink's count of ticks handed in when playing began
        self._dropped: set[int] = set()  # sessions cut for a hole (their sockets close a moment later)

    async def run(self, stop: asyncio.Event) -> None:
        """Take the namespace's lease, start it afresh, serve, wait for a claim, play, wait
        until the last tick is published; then stop. What it did is in ``report``."""
        client = bus.connect(self.settings.redis_url, self.settings.redis_cluster)
        lease = Lease(client, Keys(self.settings.namespace))
        try:
            if not await lease.acquire():
                raise NamespaceTaken(
                    f"namespace {self.settings.namespace!r} has a publisher of its own "
                    f"({lease.key} is held): replay into another with --namespace"
                )
            try:
                await self._fresh_namespace(client, lease.key)
                await self._serve(stop, lease)
            finally:
                await lease.close(release=True)
        finally:
            await client.aclose()

    async def _fresh_namespace(self, client: bus.Client, leader: str) -> None:
        """No claim, snapshot or result of an earlier replay here: a replay waits for claims
        made for it, and strategies see only its own ticks."""
        ns = self.settings.namespace
        kept = (leader, f"{ns}:leader_fence", f"{ns}:fence:")  # fence numbers never go back
        async for key in client.scan_iter(match=f"{ns}:*", count=1000):
            if not key.decode().startswith(kept):
                await client.delete(key)

    async def _serve(self, stop: asyncio.Event, lease: Lease) -> None:
        with tempfile.TemporaryDirectory(prefix="kitebus-replay-") as workdir:
            server = self.server = TickerServer(port=0, snapshots=False)
            server.paused = True
            instruments = self.settings.instruments
            if instruments is None:
                instruments = str(Path(workdir) / "instruments.csv")
                instruments_for(self.report.tokens, Path(instruments))
            async with server:
                self.publisher = Publisher(self.settings.model_copy(update={
                    "kite_ws_url": server.url, "kite_api_key": SecretStr(DEFAULT_API_KEY),
                    "kite_access_token": SecretStr(DEFAULT_ACCESS_TOKEN), "kite_access_token_file": None,
                    "accounts": [], "instruments": instruments, "metrics_port": 0,
                }), lease=lease)  # fmt: skip
                lease.start(self.publisher.health)
                await self.publisher.start()
                try:
                    self.ready.set()
                    if self.subscribe:
                        await self._claim_all()
                    await self._play(stop)
                    if self.done.is_set() and not self.exit_at_end:
                        log.info("replay: played to the end; serving on until stopped")
                        await stop.wait()
                finally:
                    await self.publisher.stop()

    async def _claim_all(self) -> None:
        richest: dict[str, list[int]] = {}
        modes: dict[int, str] = {}
        for tick in self.ticks:
            token, mode = tick["instrument_token"], tick["mode"]
            if codec.MODE_RANK[mode] > codec.MODE_RANK.get(modes.get(token, ""), -1):
                modes[token] = mode
        for token, mode in modes.items():
            richest.setdefault(mode, []).append(token)
        client = bus.connect(self.settings.redis_url, self.settings.redis_cluster)
        try:
            async with ControlClient(client, self.settings.namespace, session=False) as control:
                for mode, tokens in richest.items():
                    await control.subscribe(tokens, mode=mode, client="replay", timeout=30)
        finally:
            await client.aclose()

    async def _play(self, stop: asyncio.Event) -> None:
        assert self.server is not None and self.publisher is not None
        if not self.subscribe:
            log.info("replay: waiting for a claim of any of %d recorded tokens", len(self.report.tokens))
        while not self._claimed() and not stop.is_set():
            await asyncio.sleep(POLL)
        sink = self.publisher.sink
        self._handed = sink.queued + sink.unclaimed + sink.malformed
        given_up = sink.conflated + sink.dropped
        first_at = self.ticks[0]["recorded_at_ns"]
        began = time.monotonic()
        holes = list(self.holes)
        for at, step in _steps(self.ticks):
            due = began + (at - first_at) / 1e9 / self.speed if self.speed is not None else None
            if await self._send_held(stop, due) or (due is not None and await _stopped(stop, due)):
                return
            while holes and holes[0].start <= at:
                await self._all_arrived(stop)  # nothing sent is on its way when a session drops
                self._open_hole(holes.pop(0))
            await self._send([*self._held, *step])
            await asyncio.sleep(0)  # the publisher shares this loop: it reads and writes too
        if await self._send_held(stop, None):  # a hole still open at the end: wait it out
            return
        await self._all_arrived(stop)
        while sink.buffered and not stop.is_set():  # and written to Redis
            await asyncio.sleep(POLL)
        if stop.is_set():
            return
        self.report.seconds = time.monotonic() - began
        self.report.given_up = sink.conflated + sink.dropped - given_up
        self.done.set()

    async def _send_held(self, stop: asyncio.Event, due: float | None) -> bool:
        """Ticks waiting for a session go first: retried until none is left, or until the
        next step is ``due`` (None: until none is left). Whether ``stop`` came."""
        while self._held and (due is None or time.monotonic() < due):
            if await _stopped(stop, time.monotonic() + POLL):
                return True
            await self._send(self._held)
        return stop.is_set()

    def _arrived(self) -> int:
        assert self.publisher is not None
        sink = self.publisher.sink
        return sink.queued + sink.unclaimed + sink.malformed - self._handed

    async def _all_arrived(self, stop: asyncio.Event) -> None:
        """Wait until every tick sent has reached the publisher. One that a connection cut
        on its way never arrives: ``STANDSTILL`` seconds without progress end the wait, the
        shortfall counted in ``unarrived``."""
        progress, still_since = -1, time.monotonic()
        while (arrived := self._arrived()) < self.report.sent and not stop.is_set():
            if arrived != progress:
                progress, still_since = arrived, time.monotonic()
            elif time.monotonic() - still_since > STANDSTILL:
                lost = self.report.sent - arrived
                self.report.unarrived += lost
                self._handed -= lost  # counted once
                log.warning("replay: %d ticks sent never reached the publisher (a connection cut "
                            "them on the way)", lost)  # fmt: skip
                return
            await asyncio.sleep(POLL)

    def _claimed(self) -> bool:
        assert self.publisher is not None
        in_force = self.publisher.book.in_force
        return any(token in in_force for token in self.report.tokens) and self._sessions_ready()

    def _sessions_ready(self) -> bool:
        """Every claimed token is subscribed at some session, in its mode in force (the
        publisher has told Kite both)."""
        assert self.server is not None and self.publisher is not None
        subscribed = {(t, m) for s in self.server.sessions for t, m in s.modes.items()}
        return all((t, m) in subscribed for t, m in self.publisher.book.in_force.items())

    def _open_hole(self, hole: Hole) -> None:
        assert self.server is not None
        seconds = (hole.end - hole.start) / 1e9 / (self.speed or float("inf"))
        sessions = [s for s in self.server.sessions if hole.tokens & s.modes.keys()]
        if not sessions:
            return
        self.report.holes += 1
        log.info("replay: a recorded stale period of %d token(s), %.1fs", len(hole.tokens), seconds)
        self.server.refuse_connections(max(seconds, 0.0))
        for session in sessions:
            self._dropped.add(session.id)
            self.server.drop(session.id)

    async def _send(self, ticks: list[Tick]) -> None:
        """Each tick to the session that holds its token, in the mode in force there (at most
        the recorded one); a claimed token with no open session waits in ``_held``."""
        assert self.server is not None and self.publisher is not None
        in_force = self.publisher.book.in_force
        where: dict[int, Session] = {}  # a token's session, once Kite was told its mode in force
        for session in self.server.sessions:
            if session.id not in self._dropped and session.websocket.state is State.OPEN:
                where.update((t, session) for t, m in session.modes.items() if in_force.get(t) == m)
        out: dict[int, list[tuple[Tick, bytes]]] = {}
        held: list[Tick] = []
        for tick in ticks:
            token = tick["instrument_token"]
            session = where.get(token)
            if session is None:
                if token in in_force:
                    held.append(tick)
                else:
                    self.report.skipped += 1
                continue
            mode = min(session.modes[token], tick["mode"], key=codec.MODE_RANK.__getitem__)
            out.setdefault(session.id, []).append((tick, codec.encode_packet({**tick, "mode": mode})))
        writable = self.publisher.sink.writable
        for sid, items in out.items():
            session = next(s for s in self.server.sessions if s.id == sid)
            for start in range(0, len(items), PACKETS_PER_FRAME):
                chunk = items[start : start + PACKETS_PER_FRAME]
                # the player shares the publisher's loop: it holds back while the sink's
                # backlog is over its bound, as Kite's TCP would, so nothing is conflated
                await writable.wait()
                try:
                    await session.websocket.send(codec.encode_frame(packet for _, packet in chunk))
                except ConnectionClosed:  # the publisher lost it on its own: these go to the next
                    held += [tick for tick, _ in chunk]
                else:
                    self.report.sent += len(chunk)
        self._held = held


async def _stopped(stop: asyncio.Event, until: float) -> bool:
    """Sleep until ``until`` (monotonic) unless ``stop`` comes first; whether it came."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, until - time.monotonic()))
    return stop.is_set()


def _steps(ticks: list[Tick]) -> Iterable[tuple[int, list[Tick]]]:
    """Runs of ticks that the recorder received together (one ``recorded_at_ns``)."""
    step: list[Tick] = []
    for tick in ticks:
        if step and tick["recorded_at_ns"] != step[0]["recorded_at_ns"]:
            yield step[0]["recorded_at_ns"], step
            step = []
        step.append(tick)
    if step:
        yield step[0]["recorded_at_ns"], step


def load(root: Path, since: dt.time | None, until: dt.time | None) -> tuple[list[Tick], list[Hole]]:
    """The window's ticks and holes; raises ``EmptyWindow`` (with what there is) if no tick."""
    if not root.is_dir():
        raise EmptyWindow(f"{root} is not a directory")
    everything = read_recording(root)
    ticks = in_window(everything, since, until)
    if not ticks:
        if not everything:
            raise EmptyWindow(f"no ticks recorded under {root}")
        first, last = (_ist(t["recorded_at_ns"]) for t in (everything[0], everything[-1]))
        raise EmptyWindow(
            f"no ticks recorded between {since or 'the start'} and {until or 'the end'} (IST); "
            f"the recording runs from {first:%Y-%m-%d %H:%M:%S} to {last:%H:%M:%S}"
        )
    holes = holes_of(read_events(root), ticks[0]["recorded_at_ns"], ticks[-1]["recorded_at_ns"])
    return ticks, holes
