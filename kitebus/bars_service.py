"""``kitebus bars``: bars built from the bus's ticks, published back onto the bus.

Listens (claims nothing) to the named tokens, or to every token the publisher carries
(``{ns}:token_conn``, read again every ``follow`` seconds so new subscriptions join).
Each closed bar goes out msgpack-encoded on the channel ``{ns}:bars:{interval}:{token}``
(SPUBLISH on a cluster) and is RPUSHed onto the list of the same name, trimmed to the
newest ``keep`` (oldest first), in one pipeline. See docs/bars.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
from redis.exceptions import RedisError

from config import Keys, Settings
from consumers.bars import DEFAULT_GRACE, Bar, BarBuilder, bars_key, tick_time
from consumers.subscriber import TickSubscriber
from rediswire import bus

log = logging.getLogger("kitebus.bars")
RETRY_BASE, RETRY_CAP = 0.2, 5.0  # seconds between tries to reach a lost Redis


@dataclass
class BarsOptions:
    """What ``kitebus bars`` is asked for."""

    intervals: Sequence[str] = ("1m",)
    tokens: Sequence[int | str] = ()  # none: every token the publisher carries
    keep: int = 500  # bars kept per list
    grace: float = DEFAULT_GRACE
    follow: float = 1.0  # seconds between looks at {ns}:token_conn
    flush: float = 0.5  # seconds between flushes by the clock


class BarsService:
    """The loop: ticks in, bars out. ``published`` counts bars written to Redis."""

    def __init__(self, settings: Settings, options: BarsOptions) -> None:
        if options.keep < 1:
            raise ValueError("keep must be at least 1")
        self.settings = settings
        self.options = options
        self.keys = Keys(settings.namespace)
        self.builder = BarBuilder(options.intervals, options.grace)
        self.published = 0
        self.connected = False  # reached Redis at least once
        self.outages = 0  # times Redis was lost while running
        # the ticks' clock minus ours, as of the newest tick: the flush runs on the ticks'
        # clock, so a replay of a past day (or an exchange clock off ours) still fills its bars
        self.skew = 0.0
        self._unsent: list[Bar] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; bars still open then are not published (they are partial).
        Redis lost once running, it reconnects (the open bars kept); never reached, it raises."""
        client = bus.connect(self.settings.redis_url, self.settings.redis_cluster)
        delay = RETRY_BASE
        try:
            while not stop.is_set():
                try:
                    await self._listen(client, stop)
                except (ConnectionError, RedisError) as exc:
                    if not self.connected:
                        raise
                    self.outages += 1
                    log.warning("bars: Redis lost (%s); trying again in %.1fs", bus.describe(exc), delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    delay = min(RETRY_CAP, delay * 2)
                else:
                    delay = RETRY_BASE
        finally:
            await client.aclose()
            log.info(
                "bars stopped: published=%d late=%d open=%d unsent=%d",
                self.published, self.builder.late, len(self.builder.pending()), len(self._unsent),
            )  # fmt: skip

    async def _listen(self, client: bus.Client, stop: asyncio.Event) -> None:
        sharded = bus.is_cluster(client)
        async with TickSubscriber(
            self.settings, client=f"bars-{os.getpid()}", snapshot=False, session=False, release_on_exit=False,
        ) as sub:  # fmt: skip
            if self.options.tokens:
                await sub.listen(self.options.tokens)
            self.connected = True
            next_look = 0.0
            while not stop.is_set():
                if not self.options.tokens and time.monotonic() >= next_look:
                    await self._follow(client, sub)
                    next_look = time.monotonic() + self.options.follow
                ticks = await sub.batch(wait=self.options.flush)
                for tick in ticks:
                    self._unsent += self.builder.add(tick)
                if ticks:
                    self.skew = tick_time(ticks[-1]) - time.time()
                self._unsent += self.builder.flush(time.time() + self.skew)
                if self._unsent:
                    await self._publish(client, sharded)

    async def _follow(self, client: bus.Client, sub: TickSubscriber) -> None:
        """Listen to the tokens the publisher carries that are not listened to yet."""
        try:
            carried = {int(t) for t in await client.hkeys(self.keys.token_conn)}  # type: ignore[misc]
            new = sorted(carried - sub.listened)
            if new:
                log.info("bars: following %d new token(s)", len(new))
                await sub.listen(new)
        except (RedisError, ConnectionError) as exc:  # tried again at the next look
            log.warning("bars: cannot follow %s: %s", self.keys.token_conn, bus.describe(exc))

    async def _publish(self, client: bus.Client, sharded: bool) -> None:
        """Publish and keep the closed bars; on a Redis fault they wait for the next round."""
        command = bus.publish_command(sharded).decode()
        keep = self.options.keep
        pipe = bus.pipeline(client)
        for bar in self._unsent:
            name = bars_key(self.keys.ns, bar["interval"], bar["token"])
            data = msgpack.packb(bar)
            pipe.execute_command(command, name, data)
            pipe.rpush(name, data)
            pipe.ltrim(name, -keep, -1)
        try:
            await pipe.execute()
        except RedisError as exc:
            log.warning("bars: %d bar(s) not published yet: %s", len(self._unsent), bus.describe(exc))
            return
        self.published += len(self._unsent)
        self._unsent.clear()
