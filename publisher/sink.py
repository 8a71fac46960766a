"""Ticks -> msgpack -> pipelined PUBLISH + HSET to Redis, without ever blocking the reader.

Connections hand each frame to ``publish_frame`` (synchronous, no I/O). A writer task
drains the buffer in batches: one PUBLISH per tick on ``{ns}:ticks:{token}`` and one
HSET of ``{ns}:last`` per batch, sent as one RESP buffer. While Redis is slow or away the
buffer is bounded: the oldest ticks are dropped and counted, never unbounded memory and
never a silent loss; ticks older than ``stale_after`` when their turn comes are dropped
and counted too. Redis is reconnected with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque

from config.keys import Keys
from kitewire import codec
from publisher.resp import RespConnection
from publisher.tasks import cancel_and_wait

log = logging.getLogger("kitebus.sink")


class TickSink:
    """Owns the tick flow's Redis socket and its writer task."""

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        *,
        max_buffered: int = 100_000,
        batch_size: int = 5_000,
        write_timeout: float = 5.0,
        stale_after: float = 5.0,
    ) -> None:
        self._url = redis_url
        self._keys = keys
        self._last_key = keys.last.encode()
        self.max_buffered = max_buffered
        self.batch_size = batch_size
        self.write_timeout = write_timeout
        self._stale_ns = int(stale_after * 1e9)
        self._buffer: deque[tuple[int, list[tuple[int, bytes]]]] = deque()  # (received_at_ns, ticks)
        self._buffered = 0
        self._wake = asyncio.Event()
        self._prefixes: dict[int, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._connection: RespConnection | None = None
        # figures for status and metrics
        self.published = 0
        self.dropped = 0
        self.malformed = 0
        self.write_errors = 0
        self.redis_up = False
        self.redis_reconnects = 0
        self.last_error = ""

    # --- the hot side: called by connections for every frame -----------------------------

    def publish_frame(self, frame: bytes, received_at_ns: int) -> int:
        """Decode a frame and queue its ticks; returns how many ticks it held."""
        payloads, malformed = codec.frame_payloads(frame, received_at_ns)
        if malformed:
            self.malformed += malformed
        if payloads:
            self._buffer.append((received_at_ns, payloads))
            self._buffered += len(payloads)
            while self._buffered > self.max_buffered:
                self._drop_oldest()
            self._wake.set()
        return len(payloads)

    @property
    def buffered(self) -> int:
        return self._buffered

    # --- the writer task -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tick-sink")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Give the buffer ``flush_timeout`` seconds to drain, then stop the writer."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(flush_timeout):
                while self._buffered and self.redis_up:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        await cancel_and_wait(self._task)
        self._task = None
        if self._buffered:
            self.dropped += self._buffered
            log.warning("sink closed with unsent ticks dropped=%d", self._buffered)
            self._buffer.clear()
            self._buffered = 0
        await self._disconnect()

    async def _run(self) -> None:
        delay = 0.0
        while True:
            if self._connection is None:
                if delay:
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                try:
                    self._connection = await RespConnection.open(self._url)
                except ConnectionError as exc:
                    self._mark_down(str(exc))
                    delay = min(2.0, max(0.1, delay * 2))
                    continue
                delay = 0.0
                if not self.redis_up:
                    log.info("sink connected to redis")
                self.redis_up = True
            if not self._buffered:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            commands, replies = self._encode(batch)
            try:
                async with asyncio.timeout(self.write_timeout):
                    errors = await self._connection.execute(commands, replies)
            except Exception as exc:
                # Whether these reached Redis is unknown: counted as dropped, not re-sent twice.
                if not isinstance(exc, (ConnectionError, OSError, TimeoutError)):
                    log.exception("sink write failed unexpectedly")
                self.dropped += len(batch)
                self._mark_down(f"redis write failed: {exc.__class__.__name__}")
                await self._disconnect()
                delay = 0.1
                continue
            self.published += len(batch)
            if errors:
                self.write_errors += errors
                self.last_error = f"redis answered {errors} error(s)"

    def _drop_oldest(self) -> None:
        _, stale = self._buffer.popleft()
        self._buffered -= len(stale)
        self.dropped += len(stale)

    def _take_batch(self) -> list[tuple[int, bytes]]:
        """Up to ``batch_size`` ticks, oldest first; ticks older than ``stale_after`` are
        dropped (counted): after an outage, a strategy wants the market now, not a replay."""
        cutoff = time.time_ns() - self._stale_ns
        while self._buffer and self._buffer[0][0] < cutoff:
            self._drop_oldest()
        batch: list[tuple[int, bytes]] = []
        while self._buffer and len(batch) < self.batch_size:
            batch += self._buffer.popleft()[1]
        self._buffered -= len(batch)
        return batch

    def _encode(self, batch: list[tuple[int, bytes]]) -> tuple[bytes, int]:
        """RESP for one PUBLISH per tick and one HSET of each token's latest tick."""
        prefixes = self._prefixes
        out: list[bytes] = []
        latest: dict[int, bytes] = {}
        for token, payload in batch:
            prefix = prefixes.get(token)
            if prefix is None:
                prefix = prefixes[token] = self._publish_prefix(token)
            out += (prefix, b"$%d\r\n" % len(payload), payload, b"\r\n")
            latest[token] = payload
        out.append(
            b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n" % (2 + 2 * len(latest), len(self._last_key), self._last_key)
        )
        for token, payload in latest.items():
            name = b"%d" % token
            out += (b"$%d\r\n%b\r\n$%d\r\n" % (len(name), name, len(payload)), payload, b"\r\n")
        return b"".join(out), len(batch) + 1

    def _publish_prefix(self, token: int) -> bytes:
        channel = self._keys.ticks(token).encode()
        return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)

    def _mark_down(self, error: str) -> None:
        if self.redis_up:
            log.warning("sink lost redis error=%s", error)
            self.redis_reconnects += 1
        self.redis_up = False
        self.last_error = error

    async def _disconnect(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()
