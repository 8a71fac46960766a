"""The control flow: read ``{ns}:control``, apply, persist, answer, acknowledge.

Entries are read through consumer group ``publisher``: first this consumer's pending
entries (in flight when a previous run stopped, or read by a deposed leader: read again
every ``PENDING_AGAIN`` seconds), then new ones, in stream order, up to 100 at a time.
Each batch is applied entry by entry, then written as one ``_Batch``: its state, then
its results, then the acknowledgements, in that order (``bus.OrderedWrites``: on one
server a single transaction, under a lease a script Redis runs only while the lease is
ours; on a cluster stage after stage). A crash or a failure at any point means those
entries are applied again, which changes nothing; and a flood of garbage costs one
round trip per batch, not per entry. Entries older than the last one answered are
trimmed away (approximately, a macro node at a time): the results stream, capped too, is
the record.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from redis.exceptions import ResponseError

from config.keys import CONTROL_GROUP, RESULTS_MAXLEN, Keys
from config.settings import DEFAULT_CLIENT_TIMEOUT
from kitewire.instruments import UnknownInstrument
from publisher.connection import KiteConnection
from publisher.health import Health
from publisher.instruments import InstrumentsLoader
from publisher.lease import Fence, LeaseLost
from publisher.live import LiveWatch
from publisher.moves import Moves
from publisher.rebalance import Rebalancer
from publisher.requests import RELEASES, Request, RequestError, parse_request
from publisher.sessions import HeartbeatWatch
from publisher.subscriptions import Outcome, RebalanceBusy, SubscriptionBook
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import Backoff, cancel_and_wait

log = logging.getLogger("kitebus.control")

CONSUMER = "kitebus"

CLOCK_SKEW_MS = 60_000  # a result's id comes from its own node's clock on a cluster
RESULTS_PAGE = 500  # results read per XRANGE when looking for ones already written
# Seconds between reads of the pending entries: a deposed leader (same consumer name) may
# have read some that it could then not answer, its writes refused.
PENDING_AGAIN = 5.0
HEARTBEAT_CHECK = 0.25  # seconds between reads of {ns}:client_heartbeat

class _Batch(bus.OrderedWrites):
    """The writes of a batch of requests, in the order they must land: the state they
    change, then their results, then the acknowledgements of their entries."""

    def __init__(self, client: bus.Client, fence: bus.Fenced | None) -> None:
        super().__init__(client, 3, fence)
        self.state, self.results, self.acks = self.stages


def _tokens_text(tokens: Sequence[int]) -> str:
    return ",".join(map(str, tokens))


class ControlLoop:
    """Owns the control task. The book is the desired state; Redis gets a view of it."""

    def __init__(
        self,
        client: bus.Client,
        keys: Keys,
        book: SubscriptionBook,
        connections: Sequence[KiteConnection],
        *,
        block_ms: int = 250,  # also how long a stop may wait for the read in hand
        live: LiveWatch | None = None,
        rebalancer: Rebalancer | None = None,
        moves: Moves | None = None,
        instruments: InstrumentsLoader | None = None,
        fence: Fence | None = None,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    ) -> None:
        """``client_timeout``: this publisher's KITEBUS_CLIENT_TIMEOUT. A session client's
        own timeout comes with its requests; this one only tells when the heartbeat of a
        client that holds no claim is old enough to delete."""
        self._redis = client
        self._keys = keys
        self._book = book
        self._connections = connections
        self._block_ms = block_ms
        self._live = live
        self._rebalancer = rebalancer
        self._moves = moves or Moves()
        self._instruments = instruments or InstrumentsLoader(client, keys, None)
        self._fence = fence or Fence()  # asked before each read and write: does this publisher lead?
        self._task: asyncio.Task[None] | None = None
        self._batch: _Batch | None = None  # this batch's writes
        self._after_batch: list[Callable[[], None]] = []  # what waits for the batch's results
        self._acks: list[str] = []  # the batch's entries, acknowledged in one XACK at its end
        # Results of entries applied to the book whose batch was not written (Redis went
        # away): sent as they are when the entries come back pending, never applied twice.
        self._unwritten: dict[str, dict[str, str]] = {}
        self._dirty = False  # a batch failed part way (on a cluster): rewrite Redis from the book
        # Held from applying a batch of requests to writing it, and by a rewrite of everything:
        # a rewrite built before a release and sent after it would bring the claim back.
        self._writing = asyncio.Lock()
        self._orphans: list[dict[str, str]] = []  # this batch's results of no entry (expiries)
        self._resend: list[dict[str, str]] = []  # such results of a batch that failed
        self._quiet = _RateLimitedLog(per_second=20)
        self._client_timeout = client_timeout
        self._heartbeats = HeartbeatWatch(time.monotonic())
        self._heartbeat_check_at = 0.0  # monotonic time of the next read of the heartbeats
        self._stopping = False
        self._deposed = False  # another publisher leads: the loop has ended for good
        self.health = Health()  # the publisher's, once it is given one
        self.last_error = ""
        self.problem = ""  # what keeps the loop from working now ("" when nothing does)

    # --- start-up ------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists. Starting at 0 means
        requests written before the group ever existed are applied too."""
        try:
            await self._redis.xgroup_create(self._keys.control, CONTROL_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def load_claims(
        self,
    ) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, float]], dict[str, float]]:
        """Every client's persisted claims, their deadlines and the session clients'
        timeouts, skipping (and logging) entries that are not valid."""
        claims: dict[str, dict[int, str]] = {}
        deadlines: dict[str, dict[int, float]] = {}
        for raw_client in await self._redis.smembers(self._keys.clients):
            client = raw_client.decode()
            held: dict[int, str] = {}
            for raw_token, raw_mode in (await self._redis.hgetall(self._keys.claims(client))).items():
                try:
                    held[int(raw_token)] = raw_mode.decode()
                except ValueError:
                    log.warning("ignoring bad claim client=%s token=%r", client, raw_token[:20])
            claims[client] = held
            for raw_token, raw_deadline in (await self._redis.hgetall(self._keys.deadlines(client))).items():
                try:
                    deadlines.setdefault(client, {})[int(raw_token)] = float(raw_deadline)
                except ValueError:
                    log.warning("ignoring bad claim deadline client=%s token=%r", client, raw_token[:20])
        sessions: dict[str, float] = {}
        for raw_client, raw_timeout in (await self._redis.hgetall(self._keys.session_clients)).items():
            try:
                sessions[raw_client.decode()] = float(raw_timeout)
            except ValueError:
                log.warning("ignoring bad session client=%r timeout=%r", raw_client[:64], raw_timeout[:20])
        return claims, deadlines, sessions

    async def write_all(self) -> None:
        """Rewrite every hash and claim from the book (at start, after Redis lost data and
        after a batch failed part way), and drop the snapshots in ``{ns}:last`` of tokens
        no longer subscribed (released while no publisher ran, or just before one was
        killed)."""
        async with self._writing:
            await self._write_all()

    async def _write_all(self) -> None:
        book, keys = self._book, self._keys
        held = book.placement
        stale = [k for k in await self._redis.hkeys(keys.last) if not k.isdigit() or int(k) not in held]
        gone = [c.decode() for c in await self._redis.smembers(keys.clients) if c.decode() not in book.claims]
        async with bus.fenced(self._redis, self._fence) as pipe:
            # on a cluster: every slot this leader writes to is claimed by its fence from now on
            pipe.stamp(keys.control, keys.control_results, keys.client_activity, keys.client_heartbeat,
                       keys.status, *(keys.conn(c.index) for c in self._connections))  # fmt: skip
            for client in gone:  # released everything while the last write of it failed
                pipe.delete(keys.claims(client))
                pipe.delete(keys.deadlines(client))
            for key in (keys.token_conn, keys.token_mode, keys.token_status, keys.clients,
                        keys.session_clients):  # fmt: skip
                pipe.delete(key)
            if stale:
                pipe.hdel(keys.last, *stale)
            if book.placement:
                pipe.hset(keys.token_conn, mapping={str(t): str(book.serving(t)) for t in book.placement})
                pipe.hset(keys.token_mode, mapping={str(t): m for t, m in book.in_force.items()})
                streams = {str(t): c.stream for c in self._connections for t in c.modes}
                if streams:
                    pipe.hset(keys.token_status, mapping=streams)
            if book.sessions:
                pipe.hset(keys.session_clients, mapping={c: f"{t:g}" for c, t in book.sessions.items()})
            for client, held in book.claims.items():
                pipe.delete(keys.claims(client))
                pipe.hset(keys.claims(client), mapping={str(t): m for t, m in held.items()})
                pipe.sadd(keys.clients, client)
                self._persist_deadlines(pipe, client)
            await pipe.execute()

    async def drop_claims(self, dropped: Mapping[str, Sequence[int]]) -> None:
        """Remove claims that no longer fit (after a capacity cut) from Redis."""
        for client, tokens in dropped.items():
            log.error(
                "claims no longer fit and were dropped client=%s tokens=%s", client, _tokens_text(tokens)
            )
            async with bus.fenced(self._redis, self._fence) as pipe:
                pipe.hdel(self._keys.claims(client), *map(str, tokens))
                if client not in self._book.claims:
                    pipe.srem(self._keys.clients, client)
                await pipe.execute()

    # --- the task ------------------------------------------------------------------------

    def start(self) -> None:
        self._heartbeats.restart(time.monotonic())  # every session client gets a whole timeout
        self._task = asyncio.create_task(
            supervised("control-loop", self._run, self.health, done=lambda: self._stopping or self._deposed),
            name="control-loop",
        )

    async def close(self) -> None:
        """Stop after the request in hand. The loop is asked to stop rather than cancelled
        in the middle of a blocking XREADGROUP, which redis-py does not always survive."""
        if self._task is None:
            return
        self._stopping = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._block_ms / 1000 + 1)
        except TimeoutError:
            await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        """Read, apply, write, until stopped. Redis away or saying no (``REDIS_FAULTS``) and
        a lapsed lease are waited out, never the end of the loop; a lost lease is."""
        backoff = Backoff()
        while not self._stopping:
            try:
                if not self._fence.valid():
                    await self._fence.wait_valid()
                    if not self._fence.valid():
                        raise LeaseLost("another publisher leads")
                await self.ensure_group()
                if self._dirty:
                    await self.write_all()
                    self._dirty = False
                if self._resend:
                    for result in self._resend:
                        self._send(None, result)
                    self._resend = []
                    await self._commit()
                moves = bus.primary_moves(self._redis)
                await self._drain(pending=True)
                self.problem = ""
                backoff.reset()
                pending_at = time.monotonic() + PENDING_AGAIN
                while not self._stopping and time.monotonic() < pending_at:
                    if bus.primary_moves(self._redis) != moves:
                        # a failover: writes the old primary took in its last moments (XACKs,
                        # results, claims, a released token's HDEL) may be missing on the new
                        # one. Rewrite the state from the book and read the pending again:
                        # those answered are only acknowledged, the others applied.
                        log.warning("redis primary moved: state written again, pending requests read again")
                        self._dirty = True
                        self._heartbeats.restart(time.monotonic())  # beats may be lost with the old one
                        break
                    await self._drain(pending=False)
                    await self._expire_due()
                    await self._expire_silent()
            except (LeaseLost, bus.Deposed):  # Deposed: Redis refused a write, another leads
                self._batch_failed()
                self._heartbeats.restart(time.monotonic())
                if self._fence.lapsed:
                    continue  # wait for the renewal at the top; the entries stay pending
                log.warning("control loop stops: no longer the leader")
                self._deposed = True
                return
            except REDIS_FAULTS as exc:
                self._batch_failed()
                self._heartbeats.restart(time.monotonic())  # no client could beat meanwhile
                if isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED"):
                    log.warning("control stream moved to another node; reading it there")
                    continue  # a cluster moved the stream's slot while we waited
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    log.warning("control group missing (redis lost its data?); creating it again")
                    self._unwritten.clear()  # their entries are gone with the stream
                    self._after_batch = []
                    continue
                reason = bus.describe(exc)
                if reason != self.problem:
                    log.warning("control loop waits for redis error=%s", reason)
                self.problem = self.last_error = reason
                await backoff.wait()
            except Exception:  # a bug: the batch in hand stays pending, its results kept, as
                self._batch_failed()  # after a failed write; the supervisor restarts the loop
                raise

    def _batch_failed(self) -> None:
        """The batch's writes failed, some perhaps applied (a cluster writes key by key):
        its entries stay pending with their results kept, and Redis is rewritten from the
        book before anything else."""
        self._batch, self._acks = None, []
        self._resend += self._orphans
        self._orphans = []
        self._dirty = True

    async def _drain(self, *, pending: bool) -> None:
        """Pending entries until none are left, or one blocking read of new entries."""
        while True:
            if not self._fence.valid():  # a read moves the group on: only the leader reads
                raise LeaseLost("the lease is not valid")
            reply = await self._redis.xreadgroup(
                CONTROL_GROUP, CONSUMER, {self._keys.control: "0" if pending else ">"},
                count=100, block=None if pending else self._block_ms,
            )  # fmt: skip
            entries = reply[0][1] if reply else []
            answered = await self._answered(entries) if pending else set()
            async with self._writing:
                for entry_id, fields in entries:
                    if entry_id in answered:  # its result is in (a cluster's XACK was not): only ack it
                        self._acks.append(entry_id.decode())
                        continue
                    if (result := self._unwritten.get(entry_id.decode())) is not None:
                        self._send(entry_id.decode(), result)  # applied before its batch failed
                        continue
                    try:
                        await self._handle(entry_id.decode(), fields)
                    except REDIS_FAULTS:
                        raise
                    except Exception:  # a bug must not stall every request behind this one
                        log.exception("request id=%s failed unexpectedly", entry_id.decode())
                        self._answer_internal_error(entry_id.decode(), fields)
                await self._commit()
            if entries:  # every entry up to the last is answered and acknowledged: keep the stream short
                await self._redis.xtrim(self._keys.control, minid=entries[-1][0], approximate=True)
            if pending and not entries:  # every pending entry is done: the rest were lost with Redis
                self._unwritten.clear()
            if not pending or not entries or self._stopping:
                return

    async def _answered(self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]]) -> set[bytes]:
        """The ids among ``entries`` that already have a result: on a cluster the result and
        the XACK sit on different nodes, and a failure between them leaves such an entry
        pending. Answered again, its client would get two results."""
        if not entries:
            return set()
        oldest = min(_id_order(entry_id) for entry_id, _ in entries)[0] - CLOCK_SKEW_MS
        ids = {entry_id for entry_id, _ in entries}
        answered: set[bytes] = set()
        start = f"{max(oldest, 0)}-0"
        while True:  # page by page (the stream holds up to RESULTS_MAXLEN), until all are found
            page = await self._redis.xrange(self._keys.control_results, min=start, count=RESULTS_PAGE)
            answered.update(request for _, fields in page if (request := fields.get(b"request")) in ids)
            if len(page) < RESULTS_PAGE or answered == ids:
                return answered
            milliseconds, sequence = _id_order(page[-1][0])
            start = f"{milliseconds}-{sequence + 1}"  # just after the last one read

    async def _commit(self) -> None:
        """Write the batch (state, results, XACK), then run what waited for its results.
        If the write fails, what waited and the results stay for the retry."""
        if self._acks and self._batch is None:  # entries answered before (only acknowledged now)
            self._batch = _Batch(self._redis, self._fence)
        batch, acks = self._batch, self._acks
        if batch is not None:
            if not self._fence.valid():
                raise LeaseLost("the lease is not valid: these entries wait (or are the next leader's)")
            if acks:
                batch.acks.xack(self._keys.control, CONTROL_GROUP, *acks)
            await batch.execute()
        after = self._after_batch
        self._batch, self._after_batch, self._acks, self._orphans = None, [], [], []
        for entry_id in acks:
            self._unwritten.pop(entry_id, None)
        for step in after:
            step()

    async def _handle(self, entry_id: str, fields: Mapping[bytes, bytes] | None) -> None:
        try:
            if fields is None:
                raise RequestError("the entry was deleted from the stream before it was read")
            request = parse_request(fields)
            if request.symbols:  # nothing changes unless every symbol is known
                request = request.resolved(await self._instruments.resolve(request.symbols))
        except (RequestError, UnknownInstrument) as exc:
            self._answer(entry_id, fields, str(exc))
            return
        if request.op == "rebalance":
            await self._rebalance(entry_id, fields, request.client)
            return
        outcome = self._book.apply(request, time.time())
        if request.session is not None:
            self._heartbeats.seen(request.client, time.monotonic())
        live = self._live if request.op in ("subscribe", "set") and outcome.applied else None
        new = [t for change in outcome.plan.values() for t in change.subscribe]
        before = live.before(new) if live else {}  # before Kite hears of them: its first tick is quick
        await self._execute(outcome)
        self._answer(entry_id, fields, outcome.error, request, outcome)
        if live:  # once the result is in the stream: the follow-up must come after it
            already = [t for t in outcome.applied if t not in before]
            self._after_batch.append(lambda: live.watch(entry_id, request.client, before, already))

    async def _execute(self, outcome: Outcome) -> None:
        """Tell the connections; a token subscribed or released anew ends its move, if any."""
        if self._moves:
            for change in outcome.plan.values():
                self._moves.forget([*change.subscribe, *change.unsubscribe])
                for token, mode in change.modes.items():
                    self._moves.set_mode(token, mode)
        for index, change in outcome.plan.items():
            await self._connections[index].apply(change)

    async def _rebalance(self, entry_id: str, fields: Mapping[bytes, bytes], client: str) -> None:
        """Start moving tokens; the result lists them, a ``rebalanced`` follow-up ends it."""
        if self._rebalancer is None:
            error = "rebalance is not available in this publisher"
            outcome = Outcome((), (), error, {})
        elif self._rebalancer.busy:
            error = "a rebalance is still moving tokens: wait for its 'rebalanced' result"
            outcome = Outcome((), (), error, {})
        else:
            try:
                moved = await self._rebalancer.begin(entry_id, client)
            except RebalanceBusy as exc:
                outcome = Outcome((), (), str(exc), {})
            else:
                outcome = Outcome(moved, (), "", {})
        self._answer(entry_id, fields, outcome.error, None, outcome)

    def _answer_internal_error(self, entry_id: str, fields: Mapping[bytes, bytes] | None) -> None:
        self._answer(entry_id, fields, "internal error in the publisher (see its log)")

    async def _expire_due(self) -> None:
        """Claims whose ttl ran out lapse: a normal release, recorded as op ``expire``."""
        async with self._writing:
            for client, tokens in self._book.due(time.time()).items():
                request = Request("unsubscribe", tokens, client)
                outcome = self._book.apply(request)
                await self._execute(outcome)
                self._answer(None, None, "", request, outcome, reason="ttl ran out")
            await self._commit()

    async def _expire_silent(self) -> None:
        """Session clients whose heartbeat went silent lose every claim: a normal release,
        recorded as op ``expire`` with the reason. The heartbeats of clients that hold no
        claim are deleted once older than this publisher's client timeout."""
        if time.monotonic() < self._heartbeat_check_at or not self._fence.valid():
            return
        self._heartbeat_check_at = time.monotonic() + HEARTBEAT_CHECK
        async with self._writing:
            beats, bad = _heartbeats(await self._redis.hgetall(self._keys.client_heartbeat))
            wall, now = time.time(), time.monotonic()
            for silent in self._heartbeats.silent(self._book.sessions, beats, wall, now):
                log.warning(
                    "client %s: %s; releasing its claims tokens=%d",
                    silent.client, silent.reason, len(self._book.claims.get(silent.client, ())),
                )  # fmt: skip
                request = Request("release", (), silent.client)
                outcome = self._book.apply(request)
                self._heartbeats.forget(silent.client)
                await self._execute(outcome)
                self._answer(None, None, "", request, outcome, reason=silent.reason)
            sessions = self._book.sessions
            old = [c for c, at in beats.items() if c not in sessions and wall - at > self._client_timeout]
            if old or bad:
                if self._batch is None:
                    self._batch = _Batch(self._redis, self._fence)
                self._batch.state.hdel(self._keys.client_heartbeat, *old, *bad)
            await self._commit()

    def _answer(
        self,
        entry_id: str | None,
        fields: Mapping[bytes, bytes] | None,
        error: str,
        request: Request | None = None,
        outcome: Outcome | None = None,
        reason: str = "",
    ) -> None:
        """Queue the outcome's persistence (if any), the result and the XACK on the batch.
        Without an entry id it is the publisher's own change (an expiry, why in ``reason``):
        nothing to XACK."""
        result = {
            "request": entry_id or "",
            "op": ("expire" if entry_id is None else request.op) if request else _field(fields, "op"),
            "client": request.client if request else _field(fields, "client"),
            "ok": "1" if outcome is not None and outcome.ok else "0",
            "error": error,
            "applied": _tokens_text(outcome.applied) if outcome else "",
            "rejected": _tokens_text(outcome.rejected) if outcome else "",
        }
        if outcome is not None and outcome.released:
            result["released"] = _tokens_text(outcome.released)
        if reason:
            result["reason"] = reason
        if self._batch is None:
            self._batch = _Batch(self._redis, self._fence)
        if request is not None and outcome is not None:
            self._persist(self._batch.state, request, outcome)
        self._send(entry_id, result)
        if result["ok"] == "0" and not self._quiet.allow():
            return
        log.log(
            logging.INFO if result["ok"] == "1" else logging.WARNING,
            "request id=%s op=%s client=%s ok=%s applied=%d rejected=%d error=%r",
            entry_id, result["op"], result["client"], result["ok"], len(outcome.applied) if outcome else 0,
            len(outcome.rejected) if outcome else 0, error,
        )  # fmt: skip

    def _send(self, entry_id: str | None, result: dict[str, str]) -> None:
        """Queue a result, and the entry's XACK, on the batch."""
        if self._batch is None:
            self._batch = _Batch(self._redis, self._fence)
        results = self._batch.results
        results.xadd(self._keys.control_results, result, maxlen=RESULTS_MAXLEN, approximate=True)
        if entry_id is not None:
            self._unwritten[entry_id] = result
            self._acks.append(entry_id)
        else:
            self._orphans.append(result)

    def _persist(self, pipe: bus.Writes, request: Request, outcome: Outcome) -> None:
        keys, book = self._keys, self._book
        claims_key = keys.claims(request.client)
        released = outcome.applied if request.op in RELEASES else outcome.released
        if released:
            pipe.hdel(claims_key, *map(str, released))
        if outcome.applied and request.op not in RELEASES:
            pipe.hset(claims_key, mapping={str(t): request.mode for t in outcome.applied})  # type: ignore[misc]
            pipe.sadd(keys.clients, request.client)
        if request.client in book.claims:
            pipe.hset(keys.client_activity, request.client, f"{time.time():.3f}")
            timeout = book.sessions.get(request.client)
            if request.session is not None and timeout is not None:
                pipe.hset(keys.session_clients, request.client, f"{timeout:g}")
                pipe.hset(keys.client_heartbeat, request.client, f"{time.time():.3f}")  # a sign of life
        elif released:
            pipe.srem(keys.clients, request.client)
            pipe.hdel(keys.client_activity, request.client)
            pipe.hdel(keys.session_clients, request.client)
            pipe.hdel(keys.client_heartbeat, request.client)
        self._persist_deadlines(pipe, request.client)
        for change in outcome.plan.values():
            if change.unsubscribe:
                gone = [str(t) for t in change.unsubscribe]
                pipe.hdel(keys.token_conn, *gone)
                pipe.hdel(keys.token_mode, *gone)
            if change.subscribe:
                pipe.hset(keys.token_conn, mapping={str(t): str(book.serving(t)) for t in change.subscribe})
            modes = {**change.subscribe, **change.modes}
            if modes:
                pipe.hset(keys.token_mode, mapping={str(t): m for t, m in modes.items()})


    def _persist_deadlines(self, pipe: bus.Writes, client: str) -> None:
        """The client's claim deadlines, rewritten from the book (a handful of fields)."""
        pipe.delete(self._keys.deadlines(client))
        deadlines = self._book.deadlines.get(client)
        if deadlines:
            mapping = {str(t): f"{deadline:.3f}" for t, deadline in deadlines.items()}
            pipe.hset(self._keys.deadlines(client), mapping=mapping)


class _RateLimitedLog:
    """At most ``per_second`` rejected requests logged one by one; a flood of garbage is
    summed up in one line per second instead of flooding the log."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._second = 0
        self._logged = 0
        self._skipped = 0

    def allow(self) -> bool:
        second = int(time.monotonic())
        if second != self._second:
            if self._skipped:
                log.warning("%d more rejected requests were not logged one by one", self._skipped)
            self._second, self._logged, self._skipped = second, 0, 0
        if self._logged < self.per_second:
            self._logged += 1
            return True
        self._skipped += 1
        return False


def _heartbeats(raw: Mapping[bytes, bytes]) -> tuple[dict[str, float], list[bytes]]:
    """``{ns}:client_heartbeat`` as client -> epoch seconds, and the fields that are not."""
    beats: dict[str, float] = {}
    bad: list[bytes] = []
    for raw_client, raw_at in raw.items():
        try:
            at = float(raw_at)
            client = raw_client.decode()
        except (ValueError, UnicodeDecodeError):
            at = math.nan
        if math.isfinite(at):
            beats[client] = at
        else:
            bad.append(raw_client)
    return beats, bad


def _id_order(entry_id: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _field(fields: Mapping[bytes, bytes] | None, name: str) -> str:
    """A field of a rejected entry, cut short and made printable (it goes into a log line:
    no newline may forge another), for its result."""
    if not fields:
        return ""
    value = fields.get(name.encode(), b"")[:64].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in value)
