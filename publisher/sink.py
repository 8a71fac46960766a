"""The tick flow's writer: frames -> RESP -> Redis, lossless while Redis keeps up.

Connections hand each frame to ``publish_frame`` (synchronous, no I/O): one call of the
encoder turns it into the RESP of its PUBLISHes and updates each token's newest payload.
A writer task sends batches without waiting for the previous one (a pipeline, bounded in
bytes); a reply task counts Redis's answers as they come.

The overload policy, in order:

1. **Backpressure.** When the unsent backlog passes ``max_backlog`` bytes, ``writable`` is
   cleared and the connections stop reading their sockets until it has drained to half;
   TCP holds the rest at Kite. Nothing is lost while Redis keeps up.
2. **Conflation.** Only when the backlog has stayed over the bound for ``conflate_after``
   seconds (Redis away, or slower than the feed for that long) are ticks given up: the
   backlog is discarded and the connections read on, but the last-value cache keeps each
   token's newest payload, and once Redis takes writes again that payload is published
   once per token. Ticks given up this way are counted as ``conflated``.
3. Ticks in a batch whose write failed (fate unknown) are counted as ``dropped``; their
   tokens' newest payloads are published again too.

Redis saying no is the same: a PUBLISH answered with an error (BUSY, NOPERM, ...) counts
as dropped and its token's newest goes again a moment later; an HSET of ``{ns}:last``
refused (OOM, MISCONF, ...) has the whole snapshot written again a second later, until
Redis takes it. A server that says it is no primary (READONLY, LOADING, MASTERDOWN) has
its socket opened afresh, through Sentinel when ``REDIS_URL`` names one; with Sentinel the
socket is also reopened as soon as the sentinels name another primary. While the lease
is lapsed (``lease.py``) nothing is written, and the backlog is held and conflated as
while Redis is away: each token's newest goes out once the lease is renewed.

The cache is also what ``{ns}:last`` is written from: after every reconnect (Redis may
have come back empty) the whole hash is rewritten, and ``prune`` removes released tokens.

On a Redis Cluster (``cluster=True``) ticks go out with SPUBLISH, and there is one socket
(a *lane*) per master: each batch is split by the slot of each command's channel or key,
every lane pipelines on its own, and a batch counts as written once every lane answered
its part. A redirect (MOVED, ASK, CLUSTERDOWN, TRYAGAIN) means a slot moved or a master
is lost: the map of slots is read again and the sockets reopened, and the ticks in flight
are handled as after any failed write (counted, each token's newest published again).
There, the ``{ns}:last`` HSET of a batch may reach its node a moment before a tick of it
reaches another node's channel; consumers tell the two apart by ``seq``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Collection, Container
from dataclasses import dataclass

import msgpack

from config.keys import Keys
from config.redisurl import is_sentinel_url
from kitewire import codec
from kitewire.encoder import Encoder, frame_encoder
from publisher.health import Health
from publisher.inflight import Answers, Batch, Command, InFlight, Released, Source, tokens_of
from publisher.lease import Fence
from publisher.supervisor import supervised
from rediswire import bus, resp
from rediswire.resp import RespConnection, RespError
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.sink")

@dataclass(slots=True)
class _Queued:
    """Ticks waiting to be written: their PUBLISHes, their ``{ns}:last`` HSET fields."""

    publishes: bytes
    fields: bytes
    ticks: int  # PUBLISHes
    nfields: int
    source: Source  # what to tell their tokens from, should they be given up
    other: int = 0  # commands in ``publishes`` that are not ticks (stream status)
    route: bytes = b""  # on a cluster: a channel or key whose node all of ``publishes`` goes to
    upto: int = 0  # ``queued`` once these ticks were handed in: ticks after a watch's mark are newer

    @property
    def size(self) -> int:
        return len(self.publishes) + len(self.fields)


class TickSink:
    """Owns the tick flow's Redis socket, its writer and reply tasks, and the last-value cache."""

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        *,
        encoder: Encoder | None = None,
        epoch: int = 0,
        max_backlog: int = 4 << 20,
        max_in_flight: int = 2 << 20,
        batch_bytes: int = 256 << 10,
        conflate_after: float = 1.0,
        write_timeout: float = 5.0,
        fence: Fence | None = None,
        cluster: bool = False,
        claimed: Container[int] | None = None,
    ) -> None:
        """``cluster``: ``redis_url`` names a node of a Redis Cluster (SPUBLISH, a lane per master).
        ``claimed``: the tokens clients claim (kept by reference; None: all); packets of any
        other token are counted in ``unclaimed`` and not published."""
        self._url = redis_url
        self._cluster = cluster
        self._sentinel = is_sentinel_url(redis_url)
        self._command = bus.publish_command(cluster)
        self._topology = bus.Topology.single(redis_url)
        self._lanes_of_tokens: dict[int, int] = {}  # token -> the lane of its channel
        self._fence = fence or Fence()  # asked before each batch: does this publisher lead?
        self.health = Health()  # the publisher's, once it is given one
        self._keys = keys
        self._encoder = encoder or frame_encoder(keys.ticks("").encode(), self._command, epoch=epoch)
        self._claimed = claimed
        self._encoder.set_claimed(claimed)
        self._last_key = keys.last.encode()
        self.max_backlog = max_backlog
        self.max_in_flight = max_in_flight
        self.batch_bytes = batch_bytes
        self.conflate_after = conflate_after
        self.write_timeout = write_timeout

        self._pending: deque[_Queued] = deque()
        self._pending_bytes = 0
        self._pending_ticks = 0
        self._flight = InFlight(1)  # sent, not yet answered; a lane per Redis node
        self.cache: dict[int, bytes] = {}  # the last-value cache: newest payload per token
        self._released: set[int] = set()  # to delete from {ns}:last
        self._placed: set[int] = set()  # the tokens subscribed at the last ``prune``
        self._republish: set[int] = set()  # tokens whose newest payload was given up
        self._lost: set[int] = set()  # tokens of batches whose write failed
        self._given_up = 0  # ticks discarded since conflation began
        self.conflating = False
        self.writable = asyncio.Event()  # cleared while the connections must not read
        self.writable.set()
        self._work = asyncio.Event()
        self._overload_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        # figures for status and metrics
        self.published = 0
        self.queued = 0  # ticks handed in, in order (for "has this tick reached Redis yet?")
        self._discarded = 0  # ticks given up under overload, in all
        self.conflated = 0
        self.dropped = 0
        self.malformed = 0
        self.unclaimed = 0  # packets of tokens no client claims: not published
        self.write_errors = 0
        self.pauses = 0
        self.redis_up = False
        self.redis_reconnects = 0
        self.redirects = 0  # cluster: MOVED/ASK/CLUSTERDOWN/TRYAGAIN answers, each a re-read of the slots
        self._reopen = ""  # why the lanes must be reopened, once those in flight are answered
        self._retry_timer: asyncio.TimerHandle | None = None  # after error replies: go again
        self._snapshot_stale = False  # an HSET of {ns}:last was refused: rewrite it whole
        self._not_primary = False  # the reopen under way is for a server that is no primary
        self.last_error = ""
        self.error_at = 0.0  # monotonic: the last error reply or failed write
        # the live follow-ups: watched tokens, and those with a tick Redis took since the watch
        self._watchers: dict[int, int] = {}  # token -> watches of it
        self._marks: dict[int, int] = {}  # token -> ``queued`` when its watch began
        self.went_out: set[int] = set()

    # --- the hot side: called by connections for every frame -----------------------------

    def publish_frame(self, frame: bytes, received_at_ns: int) -> int:
        """Encode a frame and queue its PUBLISHes; returns how many ticks it held.
        Callers wait for ``writable`` before reading their next frame. On a cluster the
        frame is first dealt out by node, so that each part's SPUBLISHes go to one node."""
        nodes = len(self._topology.nodes)
        if nodes == 1:
            return self._publish(frame, received_at_ns)
        ticks = 0
        for part in codec.split_frame(frame, self._token_lane, nodes):
            if part:
                ticks += self._publish(part, received_at_ns, self._channel(part))
        return ticks

    def _publish(self, frame: bytes, received_at_ns: int, route: bytes = b"") -> int:
        encoder = self._encoder
        skipped = encoder.unclaimed
        publishes, fields, ticks, malformed = encoder.encode(frame, received_at_ns, self.cache)
        source: Source = frame
        if malformed:
            self.malformed += malformed
        if encoder.unclaimed != skipped:  # rare: Kite still sending a released token, say
            self.unclaimed += encoder.unclaimed - skipped
            claimed = self._claimed if self._claimed is not None else ()
            source = tuple(t for t in codec.frame_tokens(frame) if t in claimed)
        if not ticks:
            return 0
        self.queued += ticks
        if self.conflating:
            self._give_up(ticks, source)
        else:
            self._queue(_Queued(publishes, fields, ticks, ticks, source, route=route, upto=self.queued))
            if self.backlog_bytes > self.max_backlog and self.writable.is_set():
                self._pause()
        self._work.set()
        return ticks

    def publish_status(self, status: str, connection: int, tokens: list[int], reason: str = "") -> None:
        """Tell consumers that ``tokens`` (all on ``connection``) are now ``live`` or ``stale``:
        one message on ``{ns}:stream_status`` and ``{ns}:token_status`` updated, written in
        order with the ticks, so a consumer sees status and ticks as they happened."""
        if not tokens:
            return
        event = msgpack.packb({
            "status": status, "connection": connection, "tokens": tokens, "reason": reason, "at": time.time(),
        })  # fmt: skip
        names = [b"%d" % t for t in tokens]
        hset = [v for name in names for v in (name, status.encode())]
        channel, key = self._keys.stream_status.encode(), self._keys.token_status.encode()
        for route, command in ((channel, resp.command(self._command, channel, event)),
                               (key, resp.command(b"HSET", key, *hset))):  # fmt: skip
            self._queue(_Queued(command, b"", 0, 0, (), other=1, route=route, upto=self.queued))
        self._work.set()

    def publish_notice(self, kind: str, connection: int, reason: str) -> None:
        """A note about a connection's feed that names no token (``kite_error``: Kite's error
        text): one message on ``{ns}:stream_status`` with ``tokens`` empty, in order with the
        ticks; consumers that know only ``live`` and ``stale`` change nothing for it."""
        event = msgpack.packb({
            "status": kind, "connection": connection, "tokens": [], "reason": reason, "at": time.time(),
        })  # fmt: skip
        channel = self._keys.stream_status.encode()
        command = resp.command(self._command, channel, event)
        self._queue(_Queued(command, b"", 0, 0, (), other=1, route=channel, upto=self.queued))
        self._work.set()

    @property
    def buffered(self) -> int:
        """Ticks queued or in flight, not yet acknowledged by Redis."""
        return self._pending_ticks + self._flight.ticks

    @property
    def acknowledged(self) -> int:
        """Ticks done with: published (Redis answered), given up, or lost in a failed write.
        A tick handed in when ``queued`` was N is done with once this reaches N."""
        return self.published + self._discarded + self.dropped

    @property
    def nodes(self) -> int:
        """Redis nodes the ticks are written to: 1, or a cluster's masters."""
        return self._flight.lanes

    @property
    def backlog_bytes(self) -> int:
        return self._pending_bytes + self._flight.bytes

    def prune(self, subscribed: Collection[int]) -> None:
        """Forget tokens no longer subscribed: out of the cache, the encoder's sequence
        numbers (claimed again, a token starts at ``seq`` 1), ``{ns}:last`` and
        ``{ns}:token_status``."""
        # the tokens subscribed last time too: one released before its first tick here (just
        # after a takeover, say) has no cache entry, but the old leader's snapshot in {ns}:last
        gone = [t for t in {*self.cache, *self._placed} if t not in subscribed]
        self._placed = set(subscribed)
        for token in gone:
            self.cache.pop(token, None)
            self._republish.discard(token)
        if gone:
            self._encoder.release(gone)
            self._released.update(gone)
            self._work.set()

    # --- what went out: for the live follow-ups -------------------------------------------

    def watch(self, tokens: list[int]) -> None:
        """Note in ``went_out`` each of ``tokens`` once Redis acknowledged a PUBLISH of a tick
        of it handed in from now on (ticks conflated, dropped or refused do not count)."""
        for token in tokens:
            self._watchers[token] = self._watchers.get(token, 0) + 1
            self._marks[token] = self.queued
            self.went_out.discard(token)
        self._flight.track = bool(self._watchers)

    def unwatch(self, tokens: list[int]) -> None:
        for token in tokens:
            left = self._watchers.get(token, 0) - 1
            if left > 0:
                self._watchers[token] = left
            else:
                self._watchers.pop(token, None)
                self._marks.pop(token, None)
                self.went_out.discard(token)
        self._flight.track = bool(self._watchers)

    def _note_went_out(self, batches: list[Batch]) -> None:
        """Watched tokens with a tick in these acknowledged batches that Redis took."""
        marks, went_out = self._marks, self.went_out
        for batch in batches:
            for lane, commands in enumerate(batch.commands):
                if (lane, -1) in batch.failed or lane >= len(batch.positions):
                    continue
                index = 0
                for (count, what), upto in zip(commands, batch.positions[lane], strict=True):
                    if what is not None and not isinstance(what, Released):
                        for i, token in enumerate(tokens_of(what)):
                            mark = marks.get(token)
                            if mark is not None and upto > mark and (lane, index + i) not in batch.failed:
                                went_out.add(token)
                    index += count

    # --- overload ------------------------------------------------------------------------

    def _queue(self, item: _Queued, *, front: bool = False) -> None:
        if front:
            self._pending.appendleft(item)
        else:
            self._pending.append(item)
        self._pending_bytes += item.size
        self._pending_ticks += item.ticks

    def _pause(self) -> None:
        self.writable.clear()
        self.pauses += 1
        self._overload_timer = asyncio.get_running_loop().call_later(self.conflate_after, self._conflate)

    def _resume(self) -> None:
        if self._overload_timer is not None:
            self._overload_timer.cancel()
            self._overload_timer = None
        self.writable.set()

    def _conflate(self) -> None:
        """The backlog stayed over its bound too long: give it up, keep each token's newest."""
        self._overload_timer = None
        self.conflating = True
        log.warning(
            "redis is not keeping up; conflating backlog_bytes=%d redis_up=%s",
            self.backlog_bytes, self.redis_up,
        )  # fmt: skip
        kept: deque[_Queued] = deque()  # stream status and snapshot rewrites are never given up
        for queued in self._pending:
            if queued.ticks:
                self._give_up(queued.ticks, queued.source)
            else:
                kept.append(queued)
        self._pending = kept
        self._pending_bytes = sum(item.size for item in kept)
        self._pending_ticks = 0
        self._resume()

    def _give_up(self, ticks: int, source: Source) -> None:
        self._given_up += ticks
        self._discarded += ticks
        self._republish.update(tokens_of(source))

    def _end_conflation(self) -> None:
        """Redis takes writes again: publish each given-up token's newest payload once."""
        self.conflating = False
        given_up = [t for t in self._republish if self.cache.get(t) is not None]
        self.conflated += max(0, self._given_up - len(given_up))
        self._given_up = 0
        self._republish.clear()
        self._queue_republish({*given_up, *self._lost})
        self._lost.clear()
        log.warning("redis keeps up again; republished tokens=%d", len(given_up))

    def _requeue_lost(self) -> None:
        """After a failed write: publish again the newest payload of each token whose last
        tick may have been lost, unless a newer tick of it is still queued (no reordering)."""
        if not self._lost or self.conflating:
            return  # the end of conflation covers them
        queued = {t for item in self._pending for t in tokens_of(item.source)}
        self._queue_republish(self._lost - queued)
        self._lost.clear()

    def _queue_republish(self, tokens: set[int]) -> None:
        lanes: dict[int, dict[int, bytes]] = {}
        for token in tokens:
            if (payload := self.cache.get(token)) is not None:
                lanes.setdefault(self._token_lane(token), {})[token] = payload
        for items in lanes.values():
            publishes = b"".join(self._republish_command(token, payload) for token, payload in items.items())
            route = self._keys.ticks(next(iter(items))).encode()
            queued = _Queued(
                publishes, _fields(items), len(items), len(items), tuple(items), route=route, upto=self.queued
            )
            self._queue(queued, front=True)

    # --- the tasks -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(supervised("tick-sink", self._run, self.health), name="tick-sink")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Give the backlog ``flush_timeout`` seconds to reach Redis, then stop."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(flush_timeout if self._fence.valid() else 0):
                while (self._pending or self._flight.batches or self.conflating) and self.redis_up:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        await cancel_and_wait(self._task)
        self._task = None
        for timer in (self._overload_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._retry_timer = None
        unsent = self.buffered
        if unsent:
            self.dropped += unsent
            log.warning("sink closed with unsent ticks dropped=%d", unsent)
        self._pending.clear()
        self._flight.reset(self._flight.lanes)
        self._pending_bytes = self._pending_ticks = 0
        self.writable.set()

    async def _run(self) -> None:
        delay, first = 0.0, True
        while True:
            if delay:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                connections = await self._open()
            except ConnectionError as exc:
                self._mark_down(str(exc))
                delay = min(0.5, max(0.1, delay * 2))  # Redis back: ticks flow within half a second
                continue
            delay = 0.1
            if not first and self.cache:  # Redis may have restarted empty: rewrite all of {ns}:last
                self._queue(_Queued(b"", _fields(self.cache), 0, len(self.cache), ()), front=True)
            first = False
            self.redis_up = True
            log.info("sink connected to redis nodes=%d", len(connections))
            for connection in connections:
                connection.set_write_limit(self.max_in_flight + self.batch_bytes)
            self._flight.reset(len(connections))
            self._reopen = ""
            self._requeue_lost()
            self._work.set()
            crash: Exception | None = None
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._write(connections))
                    if self._sentinel:
                        group.create_task(self._follow_primary())
                    for lane, connection in enumerate(connections):
                        group.create_task(self._count_replies(connection, lane))
            except* (ConnectionError, OSError, TimeoutError) as failure:
                self._write_failed(f"redis write failed: {failure.exceptions[0].__class__.__name__}")
            except* Exception as failure:  # a bug: count it, then the supervisor restarts the sink
                crash = failure.exceptions[0]
                self._write_failed(f"internal error: {crash.__class__.__name__}")
            finally:
                for connection in connections:
                    await connection.close()
            if crash is not None:
                raise crash
            if self._not_primary:  # give a failover a moment before asking again
                self._not_primary, delay = False, 0.5

    async def _follow_primary(self) -> None:
        """With Sentinel: once it names another primary, finish what is in flight on this
        one and open the socket to the new one (a demoted primary takes writes for seconds
        before Sentinel reconfigures it, and its subscribers are moving away)."""
        why = await bus.primary_moved(self._url, self._topology.nodes[0])
        log.warning("sink follows the primary: %s", why)
        self._reopen = self._reopen or why
        self._work.set()

    async def _open(self) -> list[RespConnection]:
        """A socket per node: one for a server; on a cluster one per master, from a fresh
        read of which master serves which slot."""
        before = self._topology
        self._topology = await bus.topology(self._url, self._cluster)
        self._lanes_of_tokens.clear()
        if self._topology != before and self._topology.cluster:
            self._reroute_pending()
        connections: list[RespConnection] = []
        try:
            for url in self._topology.nodes:
                connections.append(await RespConnection.open(url))
        except ConnectionError:
            for connection in connections:
                await connection.close()
            raise
        return connections

    def _reroute_pending(self) -> None:
        """The map of slots changed: a queued part whose ticks now belong to more than one
        node cannot go out as one; its ticks are given up and their tokens' newest published
        again (they never went out, so nothing is sent twice)."""
        kept: deque[_Queued] = deque()
        for item in self._pending:
            tokens = tokens_of(item.source) if item.ticks else ()
            if len({self._token_lane(t) for t in tokens}) > 1:
                self.dropped += item.ticks
                self._pending_ticks -= item.ticks
                self._pending_bytes -= item.size
                self._lost.update(tokens)
            else:
                kept.append(item)
        self._pending = kept

    async def _write(self, connections: list[RespConnection]) -> None:
        while True:
            if self._reopen:  # let every lane answer what it holds, then re-read the slots
                while self._flight.batches:
                    self._work.clear()
                    await self._work.wait()
                raise RespError(f"{self._reopen}; opening the socket(s) again")
            if self.conflating and self._flight.bytes <= self.max_backlog // 2:
                self._end_conflation()
            if self._flight.bytes >= self.max_in_flight or not (
                self._pending or self._released
            ):
                self._work.clear()
                await self._work.wait()
                continue
            if not self._fence.valid():
                await self._hold()
                continue
            batch, data = self._take_batch()
            if not batch.open:
                continue
            self._flight.add(batch, data)
            for lane, part in enumerate(data):
                if part:
                    connections[lane].write(part)
            for lane, part in enumerate(data):
                if part:
                    try:
                        await connections[lane].drain()
                    except (ConnectionError, OSError) as exc:
                        if len(connections) == 1:
                            raise
                        self._lane_failed(lane, exc)

    async def _hold(self) -> None:
        """Write nothing while the lease is lapsed (the backlog is held, then conflated);
        once it is lost, the new leader publishes: give the backlog up and wait to be closed."""
        if self._fence.lapsed:
            await self._fence.wait_valid()
            return
        self.dropped += self._pending_ticks
        self._pending.clear()
        self._pending_bytes = self._pending_ticks = 0
        await asyncio.Future()  # until closed

    def _take_batch(self) -> tuple[Batch, list[bytes]]:
        """Queued PUBLISHes up to ``batch_bytes``, then one HSET of ``{ns}:last`` with the same
        ticks (and an HDEL of released tokens): the snapshot never runs ahead of the channel
        (on a cluster: of the channels on its own node). The bytes for each lane."""
        lanes = self._flight.lanes
        parts: list[list[bytes]] = [[] for _ in range(lanes)]
        replies, ticks = [0] * lanes, [0] * lanes
        fields: list[bytes] = []
        commands: list[list[Command]] = [[] for _ in range(lanes)]
        positions: list[list[int]] = [[] for _ in range(lanes)]
        size = nfields = 0
        while self._pending and size < self.batch_bytes:
            item = self._pending.popleft()
            lane = 0 if lanes == 1 else self._lane(item.route)
            parts[lane].append(item.publishes)
            replies[lane] += item.ticks + item.other
            ticks[lane] += item.ticks
            commands[lane].append((item.ticks + item.other, item.source if item.ticks else None))
            positions[lane].append(item.upto)
            fields.append(item.fields)
            size += item.size
            nfields += item.nfields
        self._pending_bytes -= size
        self._pending_ticks -= sum(ticks)
        if nfields:
            key = self._last_key
            lane = self._lane(key)
            parts[lane].append(resp.command_head(2 + 2 * nfields, b"HSET", key))
            parts[lane] += fields
            replies[lane] += 1
            commands[lane].append((1, None))
            positions[lane].append(0)
        if self._released and not self._pending:
            # Only behind every queued tick: an older HSET of a released token, sent after
            # its HDEL, would leave its snapshot in {ns}:last for good. A token back in the
            # cache by now (subscribed again) keeps its snapshot.
            released = Released(tuple(t for t in self._released if t not in self.cache))
            self._released.clear()
            if released.tokens:
                names = [b"%d" % t for t in released.tokens]
                for key in (self._last_key, self._keys.token_status.encode()):
                    lane = self._lane(key)
                    parts[lane].append(resp.command(b"HDEL", key, *names))
                    replies[lane] += 1
                    commands[lane].append((1, released))
                    positions[lane].append(0)
        data = [b"".join(part) for part in parts]
        return Batch(sum(map(len, data)), replies, ticks, commands, positions=positions), data

    def _lane(self, name: bytes) -> int:
        """The lane of a channel or key (once per queued part; tokens are cached below)."""
        try:
            return self._topology.node_of(name)
        except RespError:  # a slot nobody serves: its node's error reply brings a re-read
            return 0

    async def _count_replies(self, connection: RespConnection, lane: int) -> None:
        """Read ``lane``'s replies as they come (``InFlight`` matches them to the batches)."""
        while True:
            try:
                if self._flight.owes(lane):
                    async with asyncio.timeout(self.write_timeout):
                        data = await connection.read()
                else:
                    data = await connection.read()
            except (ConnectionError, OSError, TimeoutError) as exc:
                if self._flight.lanes == 1:
                    raise
                self._lane_failed(lane, exc)
                return
            self._settle(self._flight.read(lane, data, careful=True))

    def _lane_failed(self, lane: int, exc: BaseException) -> None:
        """One master's socket failed: what it held counts as lost; the other lanes finish
        what they hold, so that ticks that did go out there are not sent twice."""
        why = f"the socket to node {lane} failed ({exc.__class__.__name__})"
        self._settle(self._flight.fail_lane(lane), why)

    def _settle(self, answers: Answers, reopen: str = "") -> None:
        """Take in what replies (or a failure) settled. ``reopen``: why every lane must be
        reopened on a fresh map of slots, once the others have answered what they hold."""
        self.published += answers.done
        self.dropped += answers.failed
        if answers.errors:
            self.write_errors += answers.errors
            self.last_error = answers.last_error
            self.error_at = time.monotonic()
            if not reopen and not answers.redirected and not answers.not_primary:
                self._retry_soon()  # the reopen covers these
        self._lost |= answers.lost
        self._released |= answers.released
        if self._flight.completed:
            self._note_went_out(self._flight.completed)
            self._flight.completed = []
        if answers.redirected:
            self.redirects += 1
            reopen = reopen or "a slot moved or is not served"
        if answers.not_primary:
            self._not_primary = True
            reopen = reopen or answers.last_error.replace("redis answered ", "the server is no primary: ")
        self._reopen = self._reopen or reopen
        if not self.writable.is_set() and self.backlog_bytes <= self.max_backlog // 2:
            self._resume()
        self._work.set()

    def _retry_soon(self, delay: float = 0.5) -> None:
        """After error replies: a moment later, publish again the newest tick of each token
        whose tick was refused, and write the whole snapshot (an HSET may have been refused)."""
        self._snapshot_stale = True
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._requeue_lost()
        if self._snapshot_stale and self.cache and self.redis_up:
            self._snapshot_stale = False
            self._queue(_Queued(b"", _fields(self.cache), 0, len(self.cache), ()), front=True)
        self._work.set()

    @property
    def problem(self) -> str:
        """What is wrong with the tick flow's Redis now ("" when nothing is): away, or an
        error reply within the last two seconds."""
        if not self.redis_up:
            return self.last_error or "redis unreachable"
        if self.error_at and time.monotonic() - self.error_at < 2.0:
            return self.last_error
        return ""

    def _write_failed(self, error: str) -> None:
        """Batches in flight may or may not have reached Redis: their ticks are counted as
        dropped, and their tokens' newest payloads go out again after the reconnect."""
        self._settle(self._flight.fail_all())
        self._mark_down(error)

    # --- RESP ----------------------------------------------------------------------------

    def _republish_command(self, token: int, payload: bytes) -> bytes:
        return resp.command(self._command, self._keys.ticks(token), payload)

    def _token_lane(self, token: int) -> int:
        """The lane of a token's channel, in the map of slots in force."""
        lane = self._lanes_of_tokens.get(token)
        if lane is None:
            if len(self._lanes_of_tokens) >= 100_000:
                self._lanes_of_tokens.clear()
            lane = self._lanes_of_tokens[token] = self._lane(self._keys.ticks(token).encode())
        return lane

    def _channel(self, frame: bytes) -> bytes:
        """The channel of the first packet of a frame part (``split_frame`` puts a known one
        first); none for a part too short to hold a packet (a heartbeat: it publishes nothing)."""
        token = codec.first_token(frame)
        return self._keys.ticks(token).encode() if token is not None else b""

    def _mark_down(self, error: str) -> None:
        if self.redis_up:
            log.warning("sink lost redis error=%s", error)
            self.redis_reconnects += 1
        self.redis_up = False
        self.last_error = error


_fields = resp.bulk_pairs  # ``<token> <payload>`` pairs for an HSET of ``{ns}:last``
