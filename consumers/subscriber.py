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
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import msgpack
import redis.asyncio as redis

from config import Keys, Settings
from consumers.control import ControlClient, ControlResult, SubscriptionRejected
from consumers.instruments import Instruments, resolve
from publisher.tasks import cancel_and_wait

Tick = dict[str, Any]


def _redis_for(source: Settings | str | redis.Redis) -> tuple[redis.Redis, bool]:
    if isinstance(source, redis.Redis):
        return source, False
    url = source.redis_url if isinstance(source, Settings) else source
    return redis.from_url(url), True


class TickSubscriber:
    """One strategy's view of the bus. Not shared between tasks."""

    def __init__(
        self,
        source: Settings | str | redis.Redis,
        client: str = "default",
        *,
        namespace: str | None = None,
        instruments: Instruments | str | None = None,
        snapshot: bool = True,
        release_on_exit: bool = True,
        timeout: float = 10.0,
    ) -> None:
        settings = source if isinstance(source, Settings) else None
        self._source = source
        self.client = client
        self.keys = Keys(namespace or (settings.namespace if settings else "kite"))
        if instruments is None and settings is not None and settings.instruments:
            instruments = settings.instruments
        self.instruments = Instruments.from_csv(instruments) if isinstance(instruments, str) else instruments
        self.snapshot = snapshot
        self.release_on_exit = release_on_exit
        self.timeout = timeout
        self.claimed: set[int] = set()
        self._redis: redis.Redis | None = None
        self._owns_redis = False
        self._pubsub: Any = None
        self._pending: deque[Tick] = deque()  # snapshot ticks not yet yielded
        self._seen_ns: dict[int, int] = {}  # token -> received_at_ns of its snapshot
        self._listening = asyncio.Event()

    async def __aenter__(self) -> TickSubscriber:
        self._redis, self._owns_redis = _redis_for(self._source)
        self._pubsub = self._redis.pubsub()
        self.control = ControlClient(self._redis, self.keys.ns)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.release_on_exit and self.claimed:
                await self.control.unsubscribe(sorted(self.claimed), client=self.client, timeout=self.timeout)
                self.claimed.clear()
        finally:
            await self._pubsub.aclose()
            if self._owns_redis:
                await self._redis.aclose()  # type: ignore[union-attr]

    async def subscribe(self, tokens: Iterable[int | str], mode: str = "quote") -> ControlResult:
        """Claim the instruments (raises SubscriptionRejected naming refused tokens) and
        start receiving their ticks."""
        wanted = resolve(tokens, self.instruments)
        try:
            result = await self.control.subscribe(wanted, mode=mode, client=self.client, timeout=self.timeout)
        except SubscriptionRejected as exc:
            self.claimed.update(exc.result.applied)  # partly applied: still ours to release
            raise
        self.claimed.update(result.applied)
        await self.listen(result.applied)
        return result

    async def set_mode(self, tokens: Iterable[int | str], mode: str) -> ControlResult:
        return await self.control.set_mode(resolve(tokens, self.instruments), mode, client=self.client)

    async def unsubscribe(self, tokens: Iterable[int | str]) -> ControlResult:
        """Release the claims and stop receiving those ticks."""
        wanted = resolve(tokens, self.instruments)
        result = await self.control.unsubscribe(wanted, client=self.client, timeout=self.timeout)
        self.claimed.difference_update(wanted)
        await self._pubsub.unsubscribe(*(self.keys.ticks(t) for t in wanted))
        return result

    async def listen(self, tokens: Iterable[int | str]) -> None:
        """Receive ticks of instruments without claiming them (someone else holds them)."""
        wanted = resolve(tokens, self.instruments)
        if not wanted:
            return
        await self._pubsub.subscribe(*(self.keys.ticks(t) for t in wanted))  # before the snapshot: no gap
        self._listening.set()
        if self.snapshot:
            for raw in await self._redis.hmget(self.keys.last, [str(t) for t in wanted]):  # type: ignore[union-attr]
                if raw is not None:
                    tick = msgpack.unpackb(raw)
                    self._seen_ns[tick["instrument_token"]] = tick["received_at_ns"]
                    self._pending.append(tick)

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
        timeout = 0.0 if out else wait
        while len(out) < limit:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is None:
                break
            timeout = 0.0
            if message["type"] != "message":
                continue
            tick = msgpack.unpackb(message["data"])
            if self._seen_ns and tick["received_at_ns"] <= self._seen_ns.get(tick["instrument_token"], -1):
                continue  # the same tick already came as the snapshot
            out.append(tick)
        return out

    def __aiter__(self) -> AsyncIterator[Tick]:
        return self.ticks()


class BlockingTickSubscriber:
    """``TickSubscriber`` for synchronous strategies: an event loop in a thread of its own.

    with BlockingTickSubscriber(url, client="strat-1") as sub:
        sub.subscribe([408065], mode="full")
        for tick in sub:          # or sub.run(callback)
            ...
    """

    def __init__(self, source: Settings | str, client: str = "default", **options: Any) -> None:
        self._args = (source, client)
        self._options = options
        self._ticks: queue.Queue[Tick] = queue.Queue(maxsize=100_000)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kitebus-subscriber", daemon=True)
        self._subscriber: TickSubscriber | None = None
        self._pump: asyncio.Task[None] | None = None
        self.dropped = 0  # ticks the strategy was too slow to take (the queue was full)

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

    async def _forward(self) -> None:
        assert self._subscriber is not None
        async for tick in self._subscriber:
            try:
                self._ticks.put_nowait(tick)
            except queue.Full:
                self.dropped += 1

    def subscribe(self, tokens: Iterable[int | str], mode: str = "quote") -> ControlResult:
        return self._call(self._subscriber.subscribe(tokens, mode))  # type: ignore[union-attr]

    def unsubscribe(self, tokens: Iterable[int | str]) -> ControlResult:
        return self._call(self._subscriber.unsubscribe(tokens))  # type: ignore[union-attr]

    def listen(self, tokens: Iterable[int | str]) -> None:
        self._call(self._subscriber.listen(tokens))  # type: ignore[union-attr]

    def get(self, timeout: float | None = None) -> Tick:
        """The next tick; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._ticks.get(timeout=timeout)

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
