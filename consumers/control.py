"""Send subscription requests through ``{ns}:control`` and wait for their results."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as redis

from config.keys import Keys
from config.settings import load_client_timeout
from consumers.heartbeat import Heartbeat

SESSIONLESS = ("release", "rebalance")  # ops that make no claim of the client who sends them


class ControlTimeout(TimeoutError):
    """No result arrived in time: is the publisher running? ``request`` is the entry id of
    the request that went unanswered ("" for a follow-up)."""

    def __init__(self, message: str, request: str = "") -> None:
        super().__init__(message)
        self.request = request


class SubscriptionRejected(Exception):
    """The publisher rejected a request (some or all of its tokens)."""

    def __init__(self, result: ControlResult) -> None:
        self.result = result
        names = ",".join(map(str, result.rejected))
        super().__init__(result.error + (f" (rejected: {names})" if names else ""))

    @property
    def rejected(self) -> tuple[int, ...]:
        return self.result.rejected


@dataclass(frozen=True)
class ControlResult:
    """One entry of ``{ns}:control:results``."""

    request: str
    op: str
    client: str
    ok: bool
    error: str
    applied: tuple[int, ...]
    rejected: tuple[int, ...]
    released: tuple[int, ...] = ()  # op set: the claims the client no longer makes
    result_id: str = ""  # this entry's id in the results stream
    loads: tuple[int, ...] = ()  # op rebalanced: tokens per connection once the moves ended
    reason: str = ""  # op expire: why the claims went (a ttl, a silent heartbeat)

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes], result_id: str = "") -> ControlResult:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode()

        def tokens(name: str) -> tuple[int, ...]:
            return tuple(int(t) for t in text(name).split(",") if t)

        return cls(
            text("request"), text("op"), text("client"), text("ok") == "1", text("error"),
            tokens("applied"), tokens("rejected"), tokens("released"), result_id, tokens("loads"),
            text("reason"),
        )  # fmt: skip


class ClientInfo(NamedTuple):
    """One client holding claims, as ``kitebus ctl clients`` shows it."""

    claims: int
    last_request_at: float  # epoch seconds of its last applied request; 0 if unknown
    kind: str  # "session" (its claims live while it heartbeats) or "standing" (until released)
    timeout: float  # a session client's timeout in seconds; 0 for a standing one
    heartbeat_at: float  # epoch seconds of its last heartbeat; 0 if none


class ControlClient:
    """``await ControlClient(client).subscribe([408065], mode="full", client="strat-1")``.

    Its claims are session claims unless ``session=False``: they live while this process
    heartbeats (a task started with the first request, every ``client_timeout`` / 3 s;
    default KITEBUS_CLIENT_TIMEOUT), and are released by the publisher (op ``expire``)
    once it has been silent for ``client_timeout``. ``aclose()`` stops the heartbeat;
    ``heartbeat=`` shares one that outlives this client (it is not closed here).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "kite",
        *,
        session: bool = True,
        client_timeout: float | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self._redis = client
        self._keys = Keys(namespace)
        self.session = session
        self._owns_heartbeat = heartbeat is None
        if session and heartbeat is None:
            timeout = load_client_timeout() if client_timeout is None else client_timeout
            if not timeout > 0:
                raise ValueError("client_timeout must be a positive number of seconds")
            heartbeat = Heartbeat(client, self._keys, timeout)
        self.heartbeat = heartbeat if session else None

    async def aclose(self) -> None:
        """Stop this client's own heartbeat and delete it (its session claims then expire
        unless released: release first)."""
        if self.heartbeat is not None and self._owns_heartbeat:
            await self.heartbeat.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        op: str,
        tokens: Iterable[int | str] | None,
        *,
        mode: str | None = None,
        client: str = "default",
        timeout: float = 10.0,
        ttl: float | None = None,
    ) -> ControlResult:
        """Write a request and return its result (whatever ``ok`` says). ``ttl`` (seconds):
        the claim lapses by itself then. ``tokens`` is None only for rebalance."""
        latest = await self._redis.xrevrange(self._keys.control_results, count=1)
        cursor = latest[0][0] if latest else b"0-0"
        fields = {"op": op, "client": client}
        if tokens is not None:
            fields["tokens"] = ",".join(map(str, tokens))
        if mode is not None:
            fields["mode"] = mode
        if ttl is not None:
            fields["ttl"] = f"{ttl:g}"
        if self.heartbeat is not None and op not in SESSIONLESS:
            self.heartbeat.add(client)  # beating before the claim exists: it never looks silent
            fields["session"] = f"{self.heartbeat.timeout:g}"
        entry_id = (await self._redis.xadd(self._keys.control, fields)).decode()
        result = await self._find(cursor, entry_id, None, timeout)
        if result is None:
            message = f"no result for {entry_id} in {timeout:g}s: is the publisher running?"
            raise ControlTimeout(message, entry_id)
        return result

    async def wait_live(self, result: ControlResult, timeout: float = 15.0) -> ControlResult:
        """The ``live`` follow-up of a subscribe or set result: every newly subscribed token
        has ticked (``applied``), or the publisher names the silent ones (``rejected``)."""
        return await self.follow_up(result, "live", timeout)

    async def release(self, client: str, timeout: float = 10.0) -> ControlResult:
        """Release every claim of ``client`` (op ``release``): for a strategy that vanished
        without releasing. ``applied`` lists the released tokens."""
        return await self._checked("release", None, client=client, timeout=timeout)

    async def clients(self) -> dict[str, ClientInfo]:
        """Every client holding claims: how many, its last request, its kind (session or
        standing) and, for a session client, its timeout and last heartbeat."""
        keys = self._keys
        names = sorted(n.decode() for n in await self._redis.smembers(keys.clients))
        if not names:
            return {}
        activity = await self._redis.hmget(keys.client_activity, names)
        timeouts = await self._redis.hmget(keys.session_clients, names)
        beats = await self._redis.hmget(keys.client_heartbeat, names)
        out = {}
        for name, seen, timeout, beat in zip(names, activity, timeouts, beats, strict=True):
            kind = "standing" if timeout is None else "session"
            count = await self._redis.hlen(keys.claims(name))
            out[name] = ClientInfo(count, _number(seen), kind, _number(timeout), _number(beat))
        return out

    async def rebalance(self, client: str = "default", timeout: float = 30.0) -> ControlResult:
        """Even out the publisher's connections and wait until every move has ended; returns
        the ``rebalanced`` follow-up (``applied``: the moved tokens, ``loads``: per connection).
        Raises SubscriptionRejected if the publisher refused (a rebalance still running)."""
        result = await self._checked("rebalance", None, client=client, timeout=timeout)
        return await self.follow_up(result, "rebalanced", timeout)

    async def follow_up(self, result: ControlResult, op: str, timeout: float = 15.0) -> ControlResult:
        """The publisher's follow-up entry ``op`` (``live``, ``rebalanced``) for a result."""
        found = await self._find(result.result_id or "0-0", result.request, op, timeout)
        if found is None:
            raise ControlTimeout(f"no {op} follow-up for request {result.request} in {timeout:g}s")
        return found

    async def _find(
        self, cursor: bytes | str, request: str, op: str | None, timeout: float
    ) -> ControlResult | None:
        """The first result after ``cursor`` for that request (and op), or None in time."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            reply = await self._redis.xread(
                {self._keys.control_results: cursor}, count=100, block=max(1, int(min(left, 1.0) * 1000))
            )
            for _, entries in reply or []:
                for result_id, fields in entries:
                    cursor = result_id
                    if fields.get(b"request") == request.encode() and (
                        op is None or fields.get(b"op") == op.encode()
                    ):
                        return ControlResult.from_fields(fields, result_id.decode())
        return None

    async def _checked(self, op: str, tokens: Iterable[int | str] | None, **kwargs: object) -> ControlResult:
        result = await self.request(op, tokens, **kwargs)  # type: ignore[arg-type]
        if not result.ok:
            raise SubscriptionRejected(result)
        return result

    async def subscribe(
        self, tokens: Iterable[int | str], mode: str = "quote", client: str = "default",
        timeout: float = 10.0, ttl: float | None = None,
    ) -> ControlResult:
        """Subscribe; raises SubscriptionRejected naming any token that was refused."""
        return await self._checked("subscribe", tokens, mode=mode, client=client, timeout=timeout, ttl=ttl)

    async def unsubscribe(
        self, tokens: Iterable[int | str], client: str = "default", timeout: float = 10.0
    ) -> ControlResult:
        """Release this client's claim on the tokens."""
        return await self._checked("unsubscribe", tokens, client=client, timeout=timeout)

    async def set_mode(
        self, tokens: Iterable[int | str], mode: str, client: str = "default", timeout: float = 10.0,
        ttl: float | None = None,
    ) -> ControlResult:
        """Change the mode this client asks for on tokens it holds."""
        return await self._checked("mode", tokens, mode=mode, client=client, timeout=timeout, ttl=ttl)

    async def set_watchlist(
        self, tokens: Iterable[int | str], mode: str = "quote", client: str = "default",
        timeout: float = 10.0, ttl: float | None = None,
    ) -> ControlResult:
        """Make this client's claims exactly these tokens in this mode, in one step (op
        ``set``): tokens it keeps are never unsubscribed in between. All or nothing."""
        return await self._checked("set", tokens, mode=mode, client=client, timeout=timeout, ttl=ttl)


def _number(raw: bytes | None) -> float:
    try:
        return float(raw or 0)
    except ValueError:
        return 0.0
