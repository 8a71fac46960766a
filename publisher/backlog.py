"""The tick sink's pure half: what waits to be written, and how it becomes batches.

No sockets, no tasks, no clocks: ``publisher/sink.py`` owns those and calls in here.

* ``Lanes``: which Redis node (lane) a channel or key goes to, from the map of slots.
* ``Backlog``: the queue of encoded ticks and status writes, in order, with its bytes and
  ticks counted; the last-value cache (each token's newest payload); conflation (give the
  queued ticks up, remember their tokens, publish each one's newest once afterwards); the
  tokens whose write failed (published again); released tokens (deleted from
  ``{ns}:last`` only behind every queued tick); rerouting after the slots moved; and
  ``take_batch``, which cuts the next batch into one part per lane.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.keys import Keys
from publisher.inflight import Batch, Command, Released, Source, tokens_of
from rediswire import resp
from rediswire.resp import RespError

if TYPE_CHECKING:  # only the map of slots' type: rediswire.bus holds the I/O that reads it
    from rediswire import bus

LANE_CACHE_LIMIT = 100_000  # a feed of endless new tokens cannot grow it forever


@dataclass(slots=True)
class Queued:
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


class Lanes:
    """The lane (index of a Redis node) of each channel and key, in the map of slots in force."""

    def __init__(self, keys: Keys, topology: bus.Topology) -> None:
        self._keys = keys
        self.topology = topology
        self._of_tokens: dict[int, int] = {}  # token -> the lane of its channel

    @property
    def count(self) -> int:
        return len(self.topology.nodes)

    def use(self, topology: bus.Topology) -> bool:
        """Take a fresh map of slots; whether it differs from the one in force."""
        changed = topology != self.topology
        self.topology = topology
        self._of_tokens.clear()
        return changed

    def of(self, name: bytes) -> int:
        """The lane of a channel or key (once per queued part; tokens are cached below)."""
        try:
            return self.topology.node_of(name)
        except RespError:  # a slot nobody serves: its node's error reply brings a re-read
            return 0

    def of_token(self, token: int) -> int:
        """The lane of a token's channel."""
        lane = self._of_tokens.get(token)
        if lane is None:
            if len(self._of_tokens) >= LANE_CACHE_LIMIT:
                self._of_tokens.clear()
            lane = self._of_tokens[token] = self.of(self._keys.ticks(token).encode())
        return lane


class Backlog:
    """Ticks and status writes queued in order, the last-value cache, and the bookkeeping of
    ticks given up, lost and released (module docstring)."""

    def __init__(self, keys: Keys, command: bytes, lanes: Lanes) -> None:
        self._keys = keys
        self._command = command  # PUBLISH, or SPUBLISH on a cluster
        self._last_key = keys.last.encode()
        self._status_key = keys.token_status.encode()
        self.lanes = lanes
        self.pending: deque[Queued] = deque()
        self.bytes = 0
        self.ticks = 0
        self.cache: dict[int, bytes] = {}  # the last-value cache: newest payload per token
        self.released: set[int] = set()  # to delete from {ns}:last
        self.lost: set[int] = set()  # tokens of batches whose write failed
        self._placed: set[int] = set()  # the tokens subscribed at the last ``prune``
        self._republish: set[int] = set()  # tokens whose newest payload was given up
        self._given_up = 0  # ticks given up since conflation began
        self.conflating = False
        self.discarded = 0  # ticks given up under overload, in all
        self.conflated = 0  # of those, ticks not made good by a newer one published

    def __bool__(self) -> bool:
        """Whether anything waits to be written."""
        return bool(self.pending or self.released)

    def queue(self, item: Queued, *, front: bool = False) -> None:
        if front:
            self.pending.appendleft(item)
        else:
            self.pending.append(item)
        self.bytes += item.size
        self.ticks += item.ticks

    def queue_snapshot(self) -> None:
        """All of ``{ns}:last`` rewritten from the cache, ahead of everything queued."""
        if self.cache:
            self.queue(Queued(b"", resp.bulk_pairs(self.cache), 0, len(self.cache), ()), front=True)

    def clear(self) -> int:
        """Forget everything queued; the ticks it held."""
        ticks = self.ticks
        self.pending.clear()
        self.bytes = self.ticks = 0
        return ticks

    # --- overload ------------------------------------------------------------------------

    def give_up(self, ticks: int, source: Source) -> None:
        """Ticks not written: their tokens' newest payloads go out when conflation ends."""
        self._given_up += ticks
        self.discarded += ticks
        self._republish.update(tokens_of(source))

    def conflate(self) -> None:
        """Give up every queued tick (status writes and snapshot rewrites are kept)."""
        self.conflating = True
        kept: deque[Queued] = deque()
        for item in self.pending:
            if item.ticks:
                self.give_up(item.ticks, item.source)
            else:
                kept.append(item)
        self.pending = kept
        self.bytes = sum(item.size for item in kept)
        self.ticks = 0

    def end_conflation(self, upto: int) -> int:
        """Redis takes writes again: queue each given-up token's newest payload once (and
        those of lost writes); returns how many tokens were given up and are published."""
        self.conflating = False
        given_up = [t for t in self._republish if self.cache.get(t) is not None]
        self.conflated += max(0, self._given_up - len(given_up))
        self._given_up = 0
        self._republish.clear()
        self.queue_republish({*given_up, *self.lost}, upto)
        self.lost.clear()
        return len(given_up)

    def requeue_lost(self, upto: int) -> None:
        """After a failed write: publish again the newest payload of each token whose last
        tick may have been lost, unless a newer tick of it is still queued (no reordering)."""
        if not self.lost or self.conflating:
            return  # the end of conflation covers them
        queued = {t for item in self.pending for t in tokens_of(item.source)}
        self.queue_republish(self.lost - queued, upto)
        self.lost.clear()

    def queue_republish(self, tokens: set[int], upto: int) -> None:
        """The tokens' newest payloads, ahead of everything queued, one part per lane
        (``upto``: the sink's ``queued`` now, as for any tick handed in)."""
        by_lane: dict[int, dict[int, bytes]] = {}
        for token in tokens:
            if (payload := self.cache.get(token)) is not None:
                by_lane.setdefault(self.lanes.of_token(token), {})[token] = payload
        for items in by_lane.values():
            command, ticks = self._command, self._keys.ticks
            publishes = b"".join(resp.command(command, ticks(t), payload) for t, payload in items.items())
            count, route = len(items), ticks(next(iter(items))).encode()
            fields = resp.bulk_pairs(items)
            item = Queued(publishes, fields, count, count, tuple(items), route=route, upto=upto)
            self.queue(item, front=True)

    def reroute(self) -> int:
        """The map of slots changed: a queued part whose ticks now belong to more than one
        node cannot go out as one; its ticks are given up and their tokens' newest published
        again (they never went out, so nothing is sent twice). Returns the ticks dropped."""
        kept: deque[Queued] = deque()
        dropped = 0
        for item in self.pending:
            tokens = tokens_of(item.source) if item.ticks else ()
            if len({self.lanes.of_token(t) for t in tokens}) > 1:
                dropped += item.ticks
                self.ticks -= item.ticks
                self.bytes -= item.size
                self.lost.update(tokens)
            else:
                kept.append(item)
        self.pending = kept
        return dropped

    # --- released tokens -----------------------------------------------------------------

    def prune(self, subscribed: Collection[int]) -> list[int]:
        """Forget tokens no longer subscribed: out of the cache, and deleted from
        ``{ns}:last`` and ``{ns}:token_status`` once every queued tick is written. Returns them."""
        # the tokens subscribed last time too: one released before its first tick here (just
        # after a takeover, say) has no cache entry, but the old leader's snapshot in {ns}:last
        gone = [t for t in {*self.cache, *self._placed} if t not in subscribed]
        self._placed = set(subscribed)
        for token in gone:
            self.cache.pop(token, None)
            self._republish.discard(token)
        self.released.update(gone)
        return gone

    # --- batches -------------------------------------------------------------------------

    def take_batch(self, lanes: int, batch_bytes: int) -> tuple[Batch, list[bytes]]:
        """Queued PUBLISHes up to ``batch_bytes``, then one HSET of ``{ns}:last`` with the same
        ticks (and an HDEL of released tokens): the snapshot never runs ahead of the channel
        (on a cluster: of the channels on its own node). The bytes for each of ``lanes``."""
        parts: list[list[bytes]] = [[] for _ in range(lanes)]
        replies, ticks = [0] * lanes, [0] * lanes
        fields: list[bytes] = []
        commands: list[list[Command]] = [[] for _ in range(lanes)]
        positions: list[list[int]] = [[] for _ in range(lanes)]
        size = nfields = 0
        while self.pending and size < batch_bytes:
            item = self.pending.popleft()
            lane = 0 if lanes == 1 else self.lanes.of(item.route)
            parts[lane].append(item.publishes)
            replies[lane] += item.ticks + item.other
            ticks[lane] += item.ticks
            commands[lane].append((item.ticks + item.other, item.source if item.ticks else None))
            positions[lane].append(item.upto)
            fields.append(item.fields)
            size += item.size
            nfields += item.nfields
        self.bytes -= size
        self.ticks -= sum(ticks)

        def add(lane: int, data: list[bytes], what: Released | None) -> None:
            parts[lane] += data
            replies[lane] += 1
            commands[lane].append((1, what))
            positions[lane].append(0)

        if nfields:
            head = resp.command_head(2 + 2 * nfields, b"HSET", self._last_key)
            add(self._lane(self._last_key, lanes), [head, *fields], None)
        if self.released and not self.pending:
            # Only behind every queued tick: an older HSET of a released token, sent after
            # its HDEL, would leave its snapshot in {ns}:last for good. A token back in the
            # cache by now (subscribed again) keeps its snapshot.
            released = Released(tuple(t for t in self.released if t not in self.cache))
            self.released.clear()
            if released.tokens:
                names = [b"%d" % t for t in released.tokens]
                for key in (self._last_key, self._status_key):
                    add(self._lane(key, lanes), [resp.command(b"HDEL", key, *names)], released)
        data = [b"".join(part) for part in parts]
        return Batch(sum(map(len, data)), replies, ticks, commands, positions=positions), data

    def _lane(self, name: bytes, lanes: int) -> int:
        return 0 if lanes == 1 else self.lanes.of(name)
