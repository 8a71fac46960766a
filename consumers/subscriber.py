"""Ticks for strategy code: claim instruments through the control stream, read the bus.

    async with TickSubscriber("redis://localhost:6379/0", client="strat-1") as sub:
        await sub.subscribe([408065, 884737], mode="full")
        async for tick in sub:
            ...

Ticks are dicts with the official Kite client's field names (plus ``received_at_ns``).
With ``snapshot=True`` (the default) each instrument's latest tick from ``{ns}:last``
comes first, so a late joiner has a price at once. On exit the client's claims are
released. ``BlockingTickSubscriber`` is the same for synchronous code.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.exceptions import ConnectionError as RedisConnectionError

from config import Keys, Settings, load_client_timeout
from consumers.control import ControlClient, ControlResult, ControlTimeout, SubscriptionRejected
from consumers.heartbeat import Heartbeat
from consumers.instruments import names, resolve
from consumers.orders import BlockingOrderReader, OrderReader
from consumers.payloads import decode
from consumers.pubsub import Message, open_pubsub, url_of
from rediswire import bus
from rediswire.tasks import cancel_and_wait

Tick = dict[str, Any]
log = logging.getLogger("kitebus.subscriber")


def _url_for(source: Settings | str | bus.Client, client: bus.Client) -> str:
    if isinstance(source, Settings):
        return source.redis_url
    return source if isinstance(source, str) else url_of(client)


def _redis_for(source: Settings | str | bus.Client, cluster: bool | None) -> tuple[bus.Client, bool]:
    """The client to use and whether it is ours to close. ``cluster=None``: from the
    Settings, or else ``KITEBUS_REDIS_CLUSTER``."""
    if isinstance(source, Settings):
        return bus.connect(source.redis_url, source.redis_cluster if cluster is None else cluster), True
    if isinstance(source, str):
        return bus.connect(source, cluster), True
    return source, False


_gc_lock = threading.Lock()
_gc_pauses = 0  # batches being built now, in any thread
_gc_was_enabled = False  # whether the collector was on when the first of them began


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a batch of ticks is built (and back on after,
    if it was on; the collector is the process's, so other threads' too, for a batch's few
    ms). Each full tick is 15 new dicts and lists: with the collector on, a young collection
    runs every ~45 ticks and the batch's live ticks are scanned again and again, about a
    third of the decoding's cost (msgpack's docs advise the same for large messages).
    Counted across threads: two subscribers' batches overlapping in two threads leave the
    collector as the first found it, once both are done."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


@dataclass(frozen=True)
class StreamStatus:
    """A change of stream status for some of the instruments a subscriber listens to."""

    status: str  # "live" or "stale"
    tokens: tuple[int, ...]
    connection: int
    reason: str


class TickSubscriber:
    """One strategy's view of the bus. Not shared between tasks.

    Beside the ticks it keeps, per instrument: ``status`` (``live`` / ``stale``, from the
    publisher's stream status; ``on_status`` is called on each change) and ``gaps`` (ticks
    it never received, told from the publisher's sequence numbers; ``missed`` is their
    sum). When Redis cuts it off for reading too slowly, it reconnects, resubscribes,
    takes the snapshot and counts what it missed (``reconnects``), never silently.
    ``conflate_ms=N`` delivers each instrument's newest tick at most every N ms.

    Its claims live as long as this process: a heartbeat keeps them (every
    ``client_timeout`` / 3 s; default KITEBUS_CLIENT_TIMEOUT), and the publisher releases
    them once it has been silent that long. ``session=False`` makes claims that stay until
    released; with ``release_on_exit=False`` they outlive the subscriber only while another
    heartbeat (``heartbeat=``, shared) keeps them.
    """

    def __init__(
        self,
        source: Settings | str | bus.Client,
        client: str = "default",
        *,
        namespace: str | None = None,
        cluster: bool | None = None,
        snapshot: bool = True,
        release_on_exit: bool = True,
        timeout: float = 10.0,
        on_status: Callable[[StreamStatus], object] | None = None,
        conflate_ms: float = 0.0,
        max_unread: int = 10_000,
        session: bool = True,
        client_timeout: float | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        settings = source if isinstance(source, Settings) else None
        if session and heartbeat is None and client_timeout is None:
            client_timeout = settings.client_timeout if settings else load_client_timeout()
        self.session = session
        self.client_timeout = heartbeat.timeout if heartbeat else client_timeout
        self._heartbeat = heartbeat
        self._source = source
        self._cluster = cluster
        self.client = client
        self.keys = Keys(namespace or (settings.namespace if settings else "kite"))
        self.snapshot = snapshot
        self.release_on_exit = release_on_exit
        self.timeout = timeout
        self.on_status = on_status
        if conflate_ms < 0:
            raise ValueError("conflate_ms must be 0 (off) or a positive number of milliseconds")
        self.conflate_ns = int(conflate_ms * 1e6)
        self.max_unread = max_unread  # messages read ahead; past that, the backlog stays in Redis
        self.claimed: set[int] = set()
        self._modes: dict[int, str] = {}  # claimed without a ttl: token -> mode, to claim again
        self.listened: set[int] = set()
        self.silent: set[int] = set()  # subscribed, but no first tick within the publisher's timeout
        self.status: dict[int, str] = {}  # token -> "live" / "stale"
        self.gaps: dict[int, int] = {}  # token -> ticks never received
        self.missed = 0
        self.reconnects = 0
        self.conflated = 0  # ticks replaced by a newer one before delivery (conflate_ms)
        self._redis: bus.Client | None = None
        self._owns_redis = False
        self._pubsub: Any = None
        self._url = ""
        self._unread: deque[Message] = deque()  # read from Redis, not yet looked at
        self._pending: deque[Tick] = deque()  # snapshot ticks not yet yielded
        # token -> (epoch, seq, received_at_ns) of the newest tick taken
        self._last: dict[int, tuple[int, int, int]] = {}
        self._seen_ns: dict[int, int] = {}  # token -> received_at_ns, for ticks without seq
        # conflation, keyed by channel: the newest payload not yet delivered; when a recently
        # delivered channel may go again, and those in the order they went; those that may go now
        self._latest_raw: dict[bytes, bytes] = {}
        self._due_ns: dict[bytes, int] = {}
        self._cooling: deque[tuple[int, bytes]] = deque()
        self._due_now: dict[bytes, None] = {}
        self._status_channel = self.keys.stream_status.encode()
        self._listening = asyncio.Event()
        self._decode = decode  # payload -> tick, as msgpack.unpackb gives it (consumers/payloads.py)

    async def __aenter__(self) -> TickSubscriber:
        self._redis, self._owns_redis = _redis_for(self._source, self._cluster)
        self._url = _url_for(self._source, self._redis)
        self._pubsub = await open_pubsub(self._url, bus.is_cluster(self._redis), self.max_unread)
        self.control = ControlClient(
            self._redis, self.keys.ns, session=self.session, client_timeout=self.client_timeout,  # type: ignore[arg-type]
            heartbeat=self._heartbeat,
        )  # fmt: skip
        if self.control.heartbeat is not None:
            self.control.heartbeat.on_resumed.append(self._claim_again)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.control.heartbeat is not None and self._claim_again in self.control.heartbeat.on_resumed:
            self.control.heartbeat.on_resumed.remove(self._claim_again)
        try:
            if self.release_on_exit and self.claimed:
                await self.control.unsubscribe(sorted(self.claimed), client=self.client, timeout=self.timeout)
                self.claimed.clear()
        finally:
            await self.control.aclose()
            await self._pubsub.close()
            if self._owns_redis:
                await self._redis.aclose()  # type: ignore[union-attr]

    async def subscribe(
        self, tokens: Iterable[int | str], mode: str = "quote", *, ttl: float | None = None,
        wait_live: bool = True, live_timeout: float = 15.0,
    ) -> ControlResult:  # fmt: skip
        """Claim the instruments (raises SubscriptionRejected naming refused tokens), start
        receiving their ticks and, with ``wait_live``, return once each newly subscribed one
        has ticked on the bus; those that stay silent are named in ``silent`` and logged."""
        wanted = await self.resolve(tokens)
        try:
            result = await self.control.subscribe(
                wanted, mode=mode, client=self.client, timeout=self.timeout, ttl=ttl
            )
        except SubscriptionRejected as exc:
            self.claimed.update(exc.result.applied)  # partly applied: still ours to release
            self._note_modes(exc.result.applied, mode, ttl)
            raise
        self.claimed.update(result.applied)
        self._note_modes(result.applied, mode, ttl)
        await self.listen(result.applied)
        if wait_live and result.applied:
            await self._wait_live(result, live_timeout)
        return result

    def _note_modes(self, tokens: Iterable[int], mode: str, ttl: float | None = None) -> None:
        for token in tokens:
            if ttl is None:
                self._modes[token] = mode
            else:  # a claim with a deadline is not made again: it may be over by then
                self._modes.pop(token, None)

    async def _claim_again(self) -> None:
        """After a heartbeat silent for a whole timeout (this process cut off from Redis
        while the publisher ran), the publisher may have expired these claims: make them
        again, each in its mode (a claim still held is unchanged by it)."""
        by_mode: dict[str, list[int]] = {}
        for token, mode in self._modes.items():
            by_mode.setdefault(mode, []).append(token)
        for mode, tokens in by_mode.items():
            try:
                await self.control.subscribe(
                    sorted(tokens), mode=mode, client=self.client, timeout=self.timeout
                )
            except (SubscriptionRejected, ControlTimeout, *bus.REDIS_FAULTS) as exc:
                log.warning("subscriber %s: claiming again failed: %s", self.client, exc)
                continue
            log.warning("subscriber %s: claimed again tokens=%d", self.client, len(tokens))

    async def _wait_live(self, result: ControlResult, timeout: float) -> None:
        try:
            live = await self.control.wait_live(result, timeout)
        except ControlTimeout as exc:
            log.warning("subscriber %s: %s", self.client, exc)
            return
        self.silent.difference_update(live.applied)
        self.silent.update(live.rejected)
        if live.rejected:
            silent = ",".join(map(str, live.rejected))
            log.warning("subscriber %s: no first tick yet from %s", self.client, silent)

    async def set_watchlist(self, tokens: Iterable[int | str], mode: str = "quote") -> ControlResult:
        """Make this client's claims exactly these instruments (op ``set``, all or nothing),
        and listen to exactly them."""
        wanted = await self.resolve(tokens)
        result = await self.control.set_watchlist(wanted, mode=mode, client=self.client, timeout=self.timeout)
        self.claimed = set(result.applied)
        self._modes = {}
        self._note_modes(result.applied, mode)
        if result.released:
            self.listened.difference_update(result.released)
            await self._pubsub.unsubscribe(*(self.keys.ticks(t) for t in result.released))
        await self.listen([t for t in result.applied if t not in self.listened])
        return result

    async def set_mode(self, tokens: Iterable[int | str], mode: str) -> ControlResult:
        result = await self.control.set_mode(await self.resolve(tokens), mode, client=self.client)
        self._note_modes((t for t in result.applied if t in self._modes), mode)
        return result

    async def unsubscribe(self, tokens: Iterable[int | str]) -> ControlResult:
        """Release the claims and stop receiving those ticks."""
        wanted = await self.resolve(tokens)
        result = await self.control.unsubscribe(wanted, client=self.client, timeout=self.timeout)
        self.claimed.difference_update(wanted)
        for token in wanted:
            self._modes.pop(token, None)
        self.listened.difference_update(wanted)
        await self._pubsub.unsubscribe(*(self.keys.ticks(t) for t in wanted))
        return result

    async def resolve(self, tokens: Iterable[int | str]) -> list[int]:
        """Tokens as given, ``EXCHANGE:SYMBOL`` through the publisher's ``{ns}:instruments``;
        raises UnknownInstrument naming unknown symbols."""
        return await resolve(self._redis, self.keys, tokens)  # type: ignore[arg-type]

    async def symbols(self, tokens: Iterable[int]) -> dict[int, str]:
        """``EXCHANGE:SYMBOL`` of each token the publisher's instruments know."""
        return await names(self._redis, self.keys, tokens)  # type: ignore[arg-type]

    async def listen(self, tokens: Iterable[int | str]) -> None:
        """Receive ticks of instruments without claiming them (someone else holds them)."""
        wanted = await self.resolve(tokens)
        if not wanted:
            return
        channels = [self.keys.ticks(t) for t in wanted]
        if not self.listened:
            channels.append(self.keys.stream_status)
        self.listened.update(wanted)
        await self._pubsub.subscribe(*channels)  # before the snapshot: no gap
        self._listening.set()
        await self._read_status(wanted)
        if self.snapshot:
            await self._read_snapshot(wanted)

    async def _read_snapshot(self, tokens: list[int]) -> None:
        for raw in await self._redis.hmget(self.keys.last, [str(t) for t in tokens]):  # type: ignore[union-attr]
            if raw is not None:
                tick = self._decode(raw)
                if self._accept(tick):
                    self._pending.append(tick)

    async def _read_status(self, tokens: list[int]) -> None:
        values = await self._redis.hmget(self.keys.token_status, [str(t) for t in tokens])  # type: ignore[union-attr]
        for token, value in zip(tokens, values, strict=True):
            self.status[token] = value.decode() if value else "stale"

    def _accept(self, tick: Tick) -> bool:
        """Whether the tick is new to this subscriber; counts the ticks it skipped over."""
        token = tick["instrument_token"]
        seq, epoch = tick.get("seq"), tick.get("epoch")
        if seq is None:  # a publisher without sequence numbers: tell duplicates by time
            if tick["received_at_ns"] <= self._seen_ns.get(token, -1):
                return False
            self._seen_ns[token] = tick["received_at_ns"]
            return True
        last = self._last.get(token)
        received = tick["received_at_ns"]
        if last is not None and last[0] == epoch:
            if seq > last[1]:
                gap = seq - last[1] - 1
            elif received > last[2]:  # a newer tick with a lower seq: released, claimed again, seq anew
                gap = seq - 1  # those of the new claim before this one never came
            else:
                return False  # the same tick came as the snapshot or republished, or an older one
            if gap and not self.conflate_ns:
                self.gaps[token] = self.gaps.get(token, 0) + gap
                self.missed += gap
        self._last[token] = (epoch, seq, received)
        return True

    async def ticks(self) -> AsyncIterator[Tick]:
        """Snapshot ticks first, then live ticks, forever."""
        while True:
            for tick in await self.batch():
                yield tick

    async def batch(self, limit: int = 1000, wait: float = 1.0) -> list[Tick]:
        """The ticks that have arrived (snapshot ticks first), up to ``limit``: waits up to
        ``wait`` seconds for the first one, then takes what is already there. Empty after
        ``wait`` seconds with nothing to deliver."""
        if not self._listening.is_set():
            try:
                async with asyncio.timeout(wait):
                    await self._listening.wait()
            except TimeoutError:
                return []
        out: list[Tick] = []
        while self._pending and len(out) < limit:
            out.append(self._pending.popleft())
        if self.conflate_ns:
            return out + await self._conflated(limit - len(out), 0.0 if out else wait)
        timeout = 0.0 if out else wait
        unread, status, decode, accept = self._unread, self._status_channel, self._decode, self._accept
        while len(out) < limit:
            if not unread:
                unread.extend(await self._read(timeout))
                if not unread:
                    break
            timeout = 0.0
            # each message yields at most one tick: this many can be looked at without passing
            # ``limit``, so exactly the messages the one-at-a-time loop would take are taken
            with gc_paused():
                for _ in range(min(limit - len(out), len(unread))):
                    channel, data = unread.popleft()
                    if channel == status:
                        self._is_status(channel, data)
                        continue
                    tick = decode(data)
                    if accept(tick):
                        out.append(tick)
        return out

    async def _conflated(self, limit: int, wait: float) -> list[Tick]:
        """Each token's newest payload, at most once every ``conflate_ms``. Payloads are kept
        raw until delivered, so a replaced tick costs a dict update and no decoding."""
        deadline = time.monotonic() + wait
        pause = 0.0
        while True:
            messages = [*self._unread, *await self._read(pause)]
            self._unread.clear()
            self._keep_newest(messages)
            now = time.monotonic_ns()
            cooling, due = self._cooling, self._due_ns
            while cooling and cooling[0][0] <= now:  # their interval is over
                _, channel = cooling.popleft()
                del due[channel]
                if channel in self._latest_raw:
                    self._due_now[channel] = None
            out = []
            with gc_paused():
                for channel in list(self._due_now)[:limit]:
                    del self._due_now[channel]
                    tick = self._decode(self._latest_raw.pop(channel))
                    due[channel] = now + self.conflate_ns
                    cooling.append((now + self.conflate_ns, channel))
                    if self._accept(tick):
                        out.append(tick)
            left = deadline - time.monotonic()
            if out or left <= 0:
                return out
            pause = left if not cooling else min(left, max(0.0, (cooling[0][0] - now) / 1e9))

    def _keep_newest(self, messages: list[Message]) -> None:
        """Keep each channel's newest payload, raw (keyed by channel: no parsing per tick)."""
        latest, due, due_now, status = self._latest_raw, self._due_ns, self._due_now, self._status_channel
        for channel, data in messages:
            if channel == status:
                self._is_status(channel, data)
            elif channel in latest:
                self.conflated += 1
                latest[channel] = data
            else:
                if channel not in due:
                    due_now[channel] = None
                latest[channel] = data

    def _is_status(self, channel: bytes, data: bytes) -> bool:
        """Handle a stream status message (True), or say it is a tick (False)."""
        if channel != self._status_channel:
            return False
        event = msgpack.unpackb(data)
        tokens = tuple(t for t in event["tokens"] if t in self.listened)
        changed = tuple(t for t in tokens if self.status.get(t) != event["status"])
        for token in tokens:
            self.status[token] = event["status"]
        if changed and self.on_status is not None:
            self.on_status(StreamStatus(event["status"], changed, event["connection"], event["reason"]))
        return True

    async def _read(self, timeout: float) -> list[Message]:
        """Pub/sub messages; when Redis cut this connection (a consumer too slow for its
        output buffer, a node lost, a slot moved on a cluster), reconnect, resubscribe and
        take the snapshot, counting the gap."""
        try:
            return await self._pubsub.read(timeout)  # type: ignore[no-any-return]
        except (RedisConnectionError, ConnectionError) as exc:
            await self._recover(str(exc) or exc.__class__.__name__)
            return []

    async def _recover(self, reason: str) -> None:
        self.reconnects += 1
        before = self.missed
        self._unread.clear()
        await self._pubsub.close()
        self._pubsub = await open_pubsub(self._url, bus.is_cluster(self._redis), self.max_unread)
        tokens = sorted(self.listened)
        await self._pubsub.subscribe(*(self.keys.ticks(t) for t in tokens), self.keys.stream_status)
        await self._read_status(tokens)
        await self._read_snapshot(tokens)
        log.warning(
            "subscriber %s was cut off by Redis (%s); resubscribed "
            "tokens=%d missed=%d (from the snapshot; more are counted as ticks arrive)",
            self.client, reason, len(tokens), self.missed - before,
        )  # fmt: skip

    def __aiter__(self) -> AsyncIterator[Tick]:
        return self.ticks()

    def order_updates(self, after: str | None = None, *, account: str | None = None) -> OrderReader:
        """The account's order updates (every account's with ``account=None``), from the
        stream ``{ns}:orders``: after the entry id ``after`` (``update.id`` of the last one
        taken, to resume after a restart), or from now on. A reader of its own: it may run
        in a task beside the tick loop. See ``consumers/orders.py``."""
        return OrderReader(self._redis, self.keys, after, account=account)  # type: ignore[arg-type]


class BlockingTickSubscriber:
    """``TickSubscriber`` for synchronous strategies: an event loop in a thread of its own.

    with BlockingTickSubscriber(url, client="strat-1") as sub:
        sub.subscribe([408065], mode="full")
        for tick in sub:          # or sub.run(callback)
            ...

    Ticks wait for the strategy in a queue of at most ``max_queue``; a tick that finds it
    full is given up and reported as ``TickSubscriber`` reports a gap: counted in
    ``gaps[token]`` and ``missed`` (and ``dropped``, these alone), with a warning logged
    at most every ``DROP_WARNING_EVERY`` seconds. Never silently.
    """

    DROP_WARNING_EVERY = 10.0  # seconds between warnings while ticks are given up

    def __init__(
        self, source: Settings | str, client: str = "default", *, max_queue: int = 100_000, **options: Any
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._args = (source, client)
        self._options = options
        self.max_queue = max_queue
        self._ticks: queue.Queue[Tick] = queue.Queue(maxsize=max_queue)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kitebus-subscriber", daemon=True)
        self._subscriber: TickSubscriber | None = None
        self._pump: asyncio.Task[None] | None = None
        self.dropped = 0  # ticks the strategy was too slow to take (the queue was full)
        self._warned_at = 0.0  # monotonic time of the last warning about dropped ticks
        self._warned_dropped = 0  # ``dropped`` at that warning

    def _call(self, coroutine: Any, timeout: float | None = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def __enter__(self) -> BlockingTickSubscriber:
        self._thread.start()

        async def enter() -> TickSubscriber:
            return await TickSubscriber(*self._args, **self._options).__aenter__()

        async def start_pump() -> asyncio.Task[None]:
            return asyncio.create_task(self._forward())

        self._subscriber = self._call(enter())
        self._pump = self._call(start_pump())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(cancel_and_wait(self._pump))
            if self._subscriber is not None:
                self._call(self._subscriber.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    @property
    def missed(self) -> int:
        """Ticks this strategy never got: gaps on the bus plus ticks given up at a full queue."""
        return self._subscriber.missed if self._subscriber is not None else 0

    @property
    def gaps(self) -> dict[int, int]:
        """Per instrument, ticks this strategy never got (a copy)."""
        return dict(self._subscriber.gaps) if self._subscriber is not None else {}

    @property
    def reconnects(self) -> int:
        return self._subscriber.reconnects if self._subscriber is not None else 0

    async def _forward(self) -> None:
        subscriber = self._subscriber
        assert subscriber is not None
        async for tick in subscriber:
            try:
                self._ticks.put_nowait(tick)
            except queue.Full:
                self._drop(subscriber, tick)

    def _drop(self, subscriber: TickSubscriber, tick: Tick) -> None:
        """The queue is full: give the tick up as a gap, as the subscriber counts one."""
        token = tick["instrument_token"]
        subscriber.gaps[token] = subscriber.gaps.get(token, 0) + 1
        subscriber.missed += 1
        self.dropped += 1
        now = time.monotonic()
        if self._warned_dropped == 0 or now - self._warned_at >= self.DROP_WARNING_EVERY:
            log.warning(
                "subscriber %s: the strategy is too slow, its queue of %d ticks is full; "
                "ticks given up dropped=%d (since the last warning %d) missed=%d",
                subscriber.client, self.max_queue, self.dropped, self.dropped - self._warned_dropped,
                subscriber.missed,
            )  # fmt: skip
            self._warned_at, self._warned_dropped = now, self.dropped

    def subscribe(self, tokens: Iterable[int | str], mode: str = "quote") -> ControlResult:
        return self._call(self._subscriber.subscribe(tokens, mode))  # type: ignore[union-attr]

    def unsubscribe(self, tokens: Iterable[int | str]) -> ControlResult:
        return self._call(self._subscriber.unsubscribe(tokens))  # type: ignore[union-attr]

    def listen(self, tokens: Iterable[int | str]) -> None:
        self._call(self._subscriber.listen(tokens))  # type: ignore[union-attr]

    def get(self, timeout: float | None = None) -> Tick:
        """The next tick; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._ticks.get(timeout=timeout)

    def order_updates(self, after: str | None = None, *, account: str | None = None) -> BlockingOrderReader:
        """``TickSubscriber.order_updates`` for this thread: iterate it, or ``get(timeout)``;
        it may be read in another thread than the ticks."""
        reader = self._subscriber.order_updates(after, account=account)  # type: ignore[union-attr]
        return BlockingOrderReader(reader, self._call)

    def __iter__(self) -> Iterator[Tick]:
        while True:
            yield self._ticks.get()

    def run(self, callback: Callable[[Tick], object]) -> None:
        """Call ``callback`` for every tick, in this thread, until it raises StopIteration."""
        try:
            for tick in self:
                callback(tick)
        except StopIteration:
            pass
