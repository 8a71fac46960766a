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
from collections.abc import Collection, Container

import msgpack

from config.keys import Keys
from config.redisurl import is_sentinel_url
from kitewire import codec
from kitewire.encoder import Encoder, frame_encoder
from publisher.backlog import Backlog, Lanes, Queued
from publisher.health import Health
from publisher.inflight import Answers, Batch, InFlight, Released, Source, tokens_of
from publisher.lease import Fence
from publisher.supervisor import supervised
from rediswire import bus, resp
from rediswire.connection import RespConnection
from rediswire.resp import RespError
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.sink")

class TickSink:
    """Owns the tick flow's Redis sockets, its writer and reply tasks, and when they run;
    what is queued, the last-value cache and the batches are its ``Backlog``'s."""

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
        self._lanes = Lanes(keys, bus.Topology.single(redis_url))
        self._fence = fence or Fence()  # asked before each batch: does this publisher lead?
        self.health = Health()  # the publisher's, once it is given one
        self._keys = keys
        self._encoder = encoder or frame_encoder(keys.ticks("").encode(), self._command, epoch=epoch)
        self._claimed = claimed
        self._encoder.set_claimed(claimed)
        self.max_backlog = max_backlog
        self.max_in_flight = max_in_flight
        self.batch_bytes = batch_bytes
        self.conflate_after = conflate_after
        self.write_timeout = write_timeout

        self.backlog = Backlog(keys, self._command, self._lanes)  # queued, not yet sent
        self._flight = InFlight(1)  # sent, not yet answered; a lane per Redis node
        self.cache = self.backlog.cache  # the last-value cache: newest payload per token
        self.writable = asyncio.Event()  # cleared while the connections must not read
        self.writable.set()
        self._work = asyncio.Event()
        self._overload_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        # figures for status and metrics
        self.published = 0
        self.queued = 0  # ticks handed in, in order (for "has this tick reached Redis yet?")
        self.dropped = 0
        self.malformed = 0
        self.unclaimed = 0  # packets of tokens no client claims: not published
        self.write_errors = 0
        self.pauses = 0
        self.redis_up = False
        self._tried = False  # whether the sink has tried to connect yet
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
        nodes = self._lanes.count
        if nodes == 1:
            return self._publish(frame, received_at_ns)
        ticks = 0
        for part in codec.split_frame(frame, self._lanes.of_token, nodes):
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
        if self.backlog.conflating:
            self.backlog.give_up(ticks, source)
        else:
            self.backlog.queue(Queued(publishes, fields, ticks, ticks, source, route=route, upto=self.queued))
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
            self.backlog.queue(Queued(command, b"", 0, 0, (), other=1, route=route, upto=self.queued))
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
        self.backlog.queue(Queued(command, b"", 0, 0, (), other=1, route=channel, upto=self.queued))
        self._work.set()

    @property
    def buffered(self) -> int:
        """Ticks queued or in flight, not yet acknowledged by Redis."""
        return self.backlog.ticks + self._flight.ticks

    @property
    def acknowledged(self) -> int:
        """Ticks done with: published (Redis answered), given up, or lost in a failed write.
        A tick handed in when ``queued`` was N is done with once this reaches N."""
        return self.published + self.backlog.discarded + self.dropped

    @property
    def nodes(self) -> int:
        """Redis nodes the ticks are written to: 1, or a cluster's masters."""
        return self._flight.lanes

    @property
    def backlog_bytes(self) -> int:
        return self.backlog.bytes + self._flight.bytes

    def prune(self, subscribed: Collection[int]) -> None:
        """Forget tokens no longer subscribed: out of the cache, the encoder's sequence
        numbers (claimed again, a token starts at ``seq`` 1), ``{ns}:last`` and
        ``{ns}:token_status``."""
        gone = self.backlog.prune(subscribed)
        if gone:
            self._encoder.release(gone)
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
        log.warning(
            "redis is not keeping up; conflating backlog_bytes=%d redis_up=%s",
            self.backlog_bytes, self.redis_up,
        )  # fmt: skip
        self.backlog.conflate()
        self._resume()

    def _end_conflation(self) -> None:
        """Redis takes writes again: publish each given-up token's newest payload once."""
        republished = self.backlog.end_conflation(self.queued)
        log.warning("redis keeps up again; republished tokens=%d", republished)

    @property
    def conflating(self) -> bool:
        return self.backlog.conflating

    @property
    def conflated(self) -> int:
        """Ticks given up under overload and not made good by a newer one published."""
        return self.backlog.conflated

    # --- the tasks -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(supervised("tick-sink", self._run, self.health), name="tick-sink")

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Give the backlog ``flush_timeout`` seconds to reach Redis, then stop."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(flush_timeout if self._fence.valid() else 0):
                while (self.backlog.pending or self._flight.batches or self.conflating) and self.redis_up:
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
        self.backlog.clear()
        self._flight.reset(self._flight.lanes)
        self.writable.set()

    async def _run(self) -> None:
        delay, first = 0.0, True
        while True:
            if delay:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                connections = await self._open()
            except ConnectionError as exc:
                self._tried = True
                self._mark_down(str(exc))
                delay = min(0.5, max(0.1, delay * 2))  # Redis back: ticks flow within half a second
                continue
            delay = 0.1
            if not first:  # Redis may have restarted empty: rewrite all of {ns}:last
                self.backlog.queue_snapshot()
            first, self._tried = False, True
            self.redis_up = True
            log.info("sink connected to redis nodes=%d", len(connections))
            for connection in connections:
                connection.set_write_limit(self.max_in_flight + self.batch_bytes)
            self._flight.reset(len(connections))
            self._reopen = ""
            self.backlog.requeue_lost(self.queued)
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
        why = await bus.primary_moved(self._url, self._lanes.topology.nodes[0])
        log.warning("sink follows the primary: %s", why)
        self._reopen = self._reopen or why
        self._work.set()

    async def _open(self) -> list[RespConnection]:
        """A socket per node: one for a server; on a cluster one per master, from a fresh
        read of which master serves which slot."""
        topology = await bus.topology(self._url, self._cluster)
        if self._lanes.use(topology) and topology.cluster:
            self.dropped += self.backlog.reroute()
        connections: list[RespConnection] = []
        try:
            for url in topology.nodes:
                connections.append(await RespConnection.open(url))
        except ConnectionError:
            for connection in connections:
                await connection.close()
            raise
        return connections

    async def _write(self, connections: list[RespConnection]) -> None:
        while True:
            if self._reopen:  # let every lane answer what it holds, then re-read the slots
                while self._flight.batches:
                    self._work.clear()
                    await self._work.wait()
                raise RespError(f"{self._reopen}; opening the socket(s) again")
            if self.conflating and self._flight.bytes <= self.max_backlog // 2:
                self._end_conflation()
            if self._flight.bytes >= self.max_in_flight or not self.backlog:
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
        self.dropped += self.backlog.clear()
        await asyncio.Future()  # until closed

    def _take_batch(self) -> tuple[Batch, list[bytes]]:
        """The next batch, cut into one part per lane (``Backlog.take_batch``)."""
        return self.backlog.take_batch(self._flight.lanes, self.batch_bytes)

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
        self.backlog.lost |= answers.lost
        self.backlog.released |= answers.released
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
        self.backlog.requeue_lost(self.queued)
        if self._snapshot_stale and self.cache and self.redis_up:
            self._snapshot_stale = False
            self.backlog.queue_snapshot()
        self._work.set()

    @property
    def problem(self) -> str:
        """What is wrong with the tick flow's Redis now ("" when nothing is): away, or an
        error reply within the last two seconds."""
        if not self.redis_up:  # nothing to say before the first try to connect
            return (self.last_error or "redis unreachable") if self._tried else ""
        if self.error_at and time.monotonic() - self.error_at < 2.0:
            return self.last_error
        return ""

    def _write_failed(self, error: str) -> None:
        """Batches in flight may or may not have reached Redis: their ticks are counted as
        dropped, and their tokens' newest payloads go out again after the reconnect."""
        self._settle(self._flight.fail_all())
        self._mark_down(error)

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
