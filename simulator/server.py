"""A Kite-protocol ticker server over real WebSockets, with a synthetic market and faults.

It speaks the wire protocol of ``kite-ticker-protocol.md``: credentials checked at the
handshake (403 when wrong), at most 3 connections per api_key, at most 3000 instruments
per connection, ``quote`` after a plain subscribe, binary frames batching packets, a
1-byte heartbeat when idle, and each account's order updates as text messages on every
one of its sockets. Orders are made through plain HTTP GETs on the same port
(``/orders/place?tradingsymbol=INFY&quantity=10``, ``/orders/fill?order_id=…``, …; see
``_ORDER_ACTIONS``), or at random (``order_rate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from kitewire import codec
from kitewire.codec import MODE_QUOTE, MODES, divisor_of
from simulator.market import Market
from simulator.orders import OrderDesk, OrderError

log = logging.getLogger("kitebus.simulator")

DEFAULT_API_KEY = "kitebus"
DEFAULT_ACCESS_TOKEN = "simulator"
MAX_CONNECTIONS_PER_KEY = 3
MAX_TOKENS_PER_CONNECTION = 3000
PACKETS_PER_FRAME = 1000


@dataclass
class Session:
    """One client connection and what it subscribed to (token -> mode)."""

    id: int
    api_key: str
    access_token: str
    websocket: ServerConnection
    modes: dict[int, str] = field(default_factory=dict)
    stalled_until: float = 0.0
    flooding: bool = False  # a line-rate flood owns the socket: the send loop keeps off
    unsubscribed: list[int] = field(default_factory=list)  # every token this session dropped, in order
    peak: int = 0  # the most instruments this session ever held at once
    last_sent: float = 0.0
    sent_ticks: int = 0

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self.stalled_until


class TickerServer:
    """The simulator. ``async with TickerServer(...) as server:`` serves on ``server.url``.

    ``rate`` is ticks per second per instrument; ``max_rate`` the ceiling on ticks per
    second per connection (instruments then take turns). ``snapshots`` off: no tick of
    its own at subscribe or mode time (a test that sends every tick itself). ``accounts``:
    more api_key -> access_token pairs it accepts, each with its own limit of 3 sockets.
    ``order_rate``: random order updates per second (0: only those asked for), for the
    default account.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str = DEFAULT_API_KEY,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        rate: float = 1.0,
        max_rate: float = 20_000.0,
        seed: int = 0,
        heartbeat_interval: float = 1.0,
        snapshots: bool = True,
        accounts: dict[str, str] | None = None,
        order_rate: float = 0.0,
    ) -> None:
        if not 0 < rate <= 100:
            raise ValueError("rate must be in (0, 100] ticks per second per instrument")
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.host, self._port = host, port
        self.api_key, self.access_token = api_key, access_token
        self.accounts = dict(accounts or {})  # more api_key -> access_token pairs, 3 sockets each
        self.rate, self.max_rate = rate, max_rate
        self.heartbeat_interval = heartbeat_interval
        self.snapshots = snapshots
        self.market = Market(seed)
        self.market_seed = seed
        self.sessions: list[Session] = []
        self._ids = itertools.count()
        self._refuse_until = 0.0
        # what a soak checks the publisher against
        self.paused = False  # no ticks of its own (heartbeats go on): the market holds still
        self.peak = 0  # the most instruments any session ever held at once
        self.sent = 0  # ticks sent in all, over every session
        self.last_sent: dict[int, tuple[str, float]] = {}  # token -> (mode, last_price) last sent
        self.handshakes: list[float] = []  # when each handshake was attempted (epoch seconds)
        self.most_sessions = 0  # the most connections open at once
        self._server: Server | None = None
        self.order_rate = order_rate
        self.desks: dict[str, OrderDesk] = {}  # api_key -> that account's orders
        self.order_updates: list[tuple[str, dict[str, Any]]] = []  # (api_key, data) of each sent, in order
        self._random_orders: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._serve,
            self.host,
            self._port,
            process_request=self._check_handshake,
            max_size=2**20,
            ping_interval=None,  # Kite's server does not ping; the client checks liveness
        )
        self._port = self._server.sockets[0].getsockname()[1]
        if self.order_rate > 0:
            self._random_orders = asyncio.create_task(self._make_random_orders(), name="random-orders")
        log.info("simulator listening url=%s", self.url)

    async def close(self) -> None:
        if self._random_orders is not None:
            self._random_orders.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._random_orders
            self._random_orders = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TickerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self._port}"

    # --- handshake ------------------------------------------------------------------------

    async def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.startswith("/orders"):
            return await self._order_request(connection, request)
        self.handshakes.append(time.time())
        query = parse_qs(urlsplit(request.path).query)
        api_key = query.get("api_key", [""])[0]
        access_token = query.get("access_token", [""])[0]
        if time.monotonic() < self._refuse_until:
            log.info("refused connection reason=refusing")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service unavailable\n")
        valid = self.accounts.get(api_key) if api_key != self.api_key else self.access_token
        if not access_token or access_token != valid:
            log.info("refused connection reason=bad-credentials")
            return connection.respond(HTTPStatus.FORBIDDEN, "Invalid api_key or access_token\n")
        if sum(s.api_key == api_key for s in self.sessions) >= MAX_CONNECTIONS_PER_KEY:
            log.info("refused connection reason=connection-limit")
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "Maximum 3 connections per api_key\n")
        return None

    # --- one connection -------------------------------------------------------------------

    async def _serve(self, websocket: ServerConnection) -> None:
        query = parse_qs(urlsplit(websocket.request.path).query)  # type: ignore[union-attr]
        session = Session(next(self._ids), query["api_key"][0], query["access_token"][0], websocket)
        self.sessions.append(session)
        self.most_sessions = max(self.most_sessions, len(self.sessions))
        log.info("connection opened session=%d peer=%s", session.id, websocket.remote_address)
        sender = asyncio.create_task(self._send_loop(session))
        try:
            async for message in websocket:
                if isinstance(message, str):
                    await self._handle_request(session, message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self.sessions.remove(session)
            log.info("connection closed session=%d", session.id)

    async def _handle_request(self, session: Session, text: str) -> None:
        try:
            request = json.loads(text)
            action, value = request["a"], request["v"]
        except (ValueError, KeyError, TypeError):
            await self._send_error(session, "Invalid message")
            return
        try:
            if action == "subscribe":
                await self._subscribe(session, _tokens(value))
            elif action == "unsubscribe":
                for token in _tokens(value):
                    if session.modes.pop(token, None) is not None:
                        session.unsubscribed.append(token)
            elif action == "mode":
                mode, tokens = value
                if mode not in MODES:
                    raise ValueError(f"Invalid mode {mode}")
                changed = [t for t in _tokens(tokens) if session.modes.get(t, mode) != mode]
                for token in changed:
                    session.modes[token] = mode
                await self._send_current(session, changed)
            else:
                raise ValueError(f"Invalid action {action}")
        except (ValueError, TypeError) as exc:
            await self._send_error(session, str(exc) or "Invalid message")

    async def _subscribe(self, session: Session, tokens: list[int]) -> None:
        refused = 0
        added = []
        for token in tokens:
            if token in session.modes:
                continue
            if len(session.modes) >= MAX_TOKENS_PER_CONNECTION:
                refused += 1
                continue
            session.modes[token] = MODE_QUOTE
            added.append(token)
        session.peak = max(session.peak, len(session.modes))
        self.peak = max(self.peak, session.peak)
        await self._send_current(session, added)
        if refused:
            await self._send_error(
                session,
                f"Maximum {MAX_TOKENS_PER_CONNECTION} instruments per connection; {refused} not subscribed",
            )

    async def _send_current(self, session: Session, tokens: list[int]) -> None:
        """As Kite does: a tick of each newly subscribed (or re-moded) instrument at once."""
        if not tokens or session.stalled or session.flooding or not self.snapshots:
            return
        stamp = int(time.time())
        packets = [self._packet(t, session.modes[t], stamp) for t in tokens]
        with contextlib.suppress(ConnectionClosed):
            await self._send_packets(session, packets)

    async def _send_error(self, session: Session, message: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await session.websocket.send(json.dumps({"type": "error", "data": message}))

    async def _send_loop(self, session: Session) -> None:
        """Every 1/rate seconds one tick per instrument (up to the ceiling); a heartbeat
        whenever nothing was sent for ``heartbeat_interval``."""
        period = 1.0 / self.rate
        step = min(period, self.heartbeat_interval)
        budget = max(1, int(self.max_rate * period))
        turn = 0
        next_tick = time.monotonic() + period
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(step)
                now = time.monotonic()
                if session.stalled or session.flooding or self.paused:
                    idle = self.paused and not (session.stalled or session.flooding)
                    if idle and now - session.last_sent >= self.heartbeat_interval:
                        await session.websocket.send(codec.HEARTBEAT)
                        session.last_sent = now
                    continue
                if now >= next_tick and session.modes:
                    next_tick = max(next_tick + period, now)  # behind: no catch-up burst
                    tokens = list(session.modes.items())
                    if len(tokens) > budget:
                        start = turn % len(tokens)
                        tokens = (tokens[start:] + tokens[:start])[:budget]
                        turn += budget
                    stamp = int(time.time())
                    packets = [self._packet(t, m, stamp) for t, m in tokens]
                    await self._send_packets(session, packets)
                elif now - session.last_sent >= self.heartbeat_interval:
                    await session.websocket.send(codec.HEARTBEAT)
                    session.last_sent = now

    def _packet(self, token: int, mode: str, stamp: int) -> bytes:
        tick = self.market.tick(token, mode, stamp)
        self.last_sent[token] = (mode, tick["last_price"])
        return codec.encode_packet(tick)

    async def _send_packets(self, session: Session, packets: list[bytes]) -> None:
        for start in range(0, len(packets), PACKETS_PER_FRAME):
            chunk = packets[start : start + PACKETS_PER_FRAME]
            await session.websocket.send(codec.encode_frame(chunk))
            session.sent_ticks += len(chunk)
            self.sent += len(chunk)
        session.last_sent = time.monotonic()

    # --- faults ---------------------------------------------------------------------------

    def _pick(self, session: int | None) -> list[Session]:
        if session is None:
            return list(self.sessions)
        return [s for s in self.sessions if s.id == session]

    def drop(self, session: int | None = None) -> int:
        """Cut connections abruptly (no close frame, as a network blip does); returns how many."""
        targets = self._pick(session)
        for target in targets:
            target.websocket.transport.abort()
        return len(targets)

    def stall(self, seconds: float, session: int | None = None) -> None:
        """Send nothing at all, not even heartbeats, for ``seconds`` (a ghost connection)."""
        for target in self._pick(session):
            target.stalled_until = time.monotonic() + seconds

    async def send_malformed(self, session: int | None = None) -> None:
        """Send a frame whose packet count promises more than the frame holds."""
        await self.send_raw((5).to_bytes(2, "big") + (184).to_bytes(2, "big") + b"\x00" * 30, session)

    async def send_raw(self, message: bytes | str, session: int | None = None) -> None:
        """Send any binary or text message as it is (hostile-input tests)."""
        for target in self._pick(session):
            with contextlib.suppress(ConnectionClosed):
                await target.websocket.send(message)

    async def send_error(self, message: str, session: int | None = None) -> None:
        """Send ``{"type": "error", "data": message}``."""
        for target in self._pick(session):
            await self._send_error(target, message)

    async def send_ticks(self, ticks: list[dict]) -> int:
        """Send these exact ticks to every connection that subscribed their tokens, each in
        the mode that connection set (as Kite does), one frame per connection. Give full-mode
        tick dicts (the codec picks each mode's fields). Returns the packets sent."""
        sent = 0
        for session in list(self.sessions):
            packets = [
                codec.encode_packet({**tick, "mode": session.modes[tick["instrument_token"]]})
                for tick in ticks
                if tick["instrument_token"] in session.modes
            ]
            if packets:
                with contextlib.suppress(ConnectionClosed):
                    await session.websocket.send(codec.encode_frame(packets))
                    sent += len(packets)
        return sent

    async def send_unsubscribed(self, ticks: list[dict], session: int | None = None) -> int:
        """Send these ticks whether or not the connection subscribed their tokens (as Kite
        may for a moment after an unsubscribe), one frame per connection; returns the packets."""
        sent = 0
        frame = codec.encode_frame(codec.encode_packet(tick) for tick in ticks)
        for target in self._pick(session):
            with contextlib.suppress(ConnectionClosed):
                await target.websocket.send(frame)
                sent += len(ticks)
        return sent

    # --- order updates --------------------------------------------------------------------

    def desk(self, api_key: str | None = None) -> OrderDesk:
        """The orders of the account ``api_key`` (the default account's by default)."""
        api_key = api_key or self.api_key
        desk = self.desks.get(api_key)
        if desk is None:
            user = f"KB{len(self.desks) + 1:04d}"
            desk = self.desks[api_key] = OrderDesk(user, price_of=self._price_of, seed=len(self.desks))
        return desk

    def _price_of(self, token: int) -> float:
        return self.market.quote(token).last / divisor_of(token)

    async def send_order(self, data: dict[str, Any], api_key: str | None = None) -> int:
        """Send ``{"type": "order", "data": data}`` on every socket of the account, as Kite
        does; returns on how many."""
        api_key = api_key or self.api_key
        self.order_updates.append((api_key, data))
        text = json.dumps({"type": "order", "data": data})
        sent = 0
        for session in [s for s in self.sessions if s.api_key == api_key]:
            with contextlib.suppress(ConnectionClosed):
                await session.websocket.send(text)
                sent += 1
        return sent

    async def order(self, action: str, api_key: str | None = None, **params: Any) -> dict[str, Any]:
        """Apply ``action`` (``place``, ``fill``, ``modify``, ``cancel``, ``reject``) to the
        account's orders with the desk's arguments, send the update; returns it. Raises
        OrderError for a request the desk refuses."""
        if action not in _ORDER_ACTIONS:
            raise OrderError(f"unknown action {action!r}: one of {', '.join(_ORDER_ACTIONS)}")
        update = getattr(self.desk(api_key), action)(**params)
        await self.send_order(update, api_key)
        return update

    async def _order_request(self, connection: ServerConnection, request: Request) -> Response:
        """``GET /orders`` (every order's state), ``GET /orders/<action>?<arguments>``."""
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        api_key = query.pop("api_key", None)
        action = parts.path.removeprefix("/orders").strip("/")
        try:
            if not action:
                body: Any = list(self.desk(api_key).orders.values())
            else:
                body = await self.order(action, api_key, **_order_arguments(action, query))
        except (OrderError, TypeError, ValueError) as exc:
            return _json_response(connection, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        return _json_response(connection, HTTPStatus.OK, body)

    async def _make_random_orders(self) -> None:
        rng = random.Random(self.market_seed)
        while True:
            await asyncio.sleep(rng.expovariate(self.order_rate))
            await self.send_order(self.desk().random_step())

    async def rotate_access_token(self, access_token: str) -> int:
        """Kite's daily logout: from now on only ``access_token`` is valid, and every
        connection opened with another one is closed. Returns how many were closed."""
        self.access_token = access_token
        expired = [s for s in self.sessions if s.access_token != access_token]
        for session in expired:
            await session.websocket.close(code=1000, reason="access token expired")
        log.info("access token rotated closed=%d", len(expired))
        return len(expired)

    def refuse_connections(self, seconds: float) -> None:
        """Refuse every new handshake (HTTP 503) for ``seconds``."""
        self._refuse_until = time.monotonic() + seconds

    async def flood(self, ticks: int, session: int | None = None) -> int:
        """Send ``ticks`` ticks per connection for its instruments as fast as the sockets take
        them, the connections taking turns frame by frame (idle ones keep their heartbeats).

        Packets are prepared first (a few per instrument, cycled) so the flood measures the
        receiver, not the market model. Returns the ticks sent in all.
        """
        targets = [s for s in self._pick(session) if s.modes]
        sent = await asyncio.gather(*(self._flood_one(s, ticks) for s in targets))
        return sum(sent)

    async def _flood_one(self, session: Session, ticks: int) -> int:
        frames = self._flood_frames(session, ticks, PACKETS_PER_FRAME)
        sent = 0
        try:
            for frame, size in frames:
                await session.websocket.send(frame)
                sent += size
                session.last_sent = time.monotonic()
                # websockets' send() does not yield while the transport takes data: without
                # this, one flooding connection would starve every other one, heartbeats too.
                await asyncio.sleep(0)
        except ConnectionClosed as exc:
            log.warning("flood cut short session=%d sent=%d close=%s", session.id, sent, exc)
        session.sent_ticks += sent
        return sent

    async def flood_line_rate(
        self, ticks: int, *, sequential: bool = True, packets_per_frame: int = 500
    ) -> int:
        """The harsh flood: ``ticks`` ticks per connection from prebuilt WebSocket frames,
        written straight to each socket as fast as TCP takes them. ``sequential``: connection
        after connection (all of the first's frames, then the second's, ...); otherwise all
        at once. Connections waiting their turn keep their heartbeats. Returns ticks sent."""
        targets = [s for s in self.sessions if s.modes]
        wire = [(s, *_websocket_frames(self._flood_frames(s, ticks, packets_per_frame))) for s in targets]
        if sequential:
            return sum([await self._write_raw(*item) for item in wire])
        return sum(await asyncio.gather(*(self._write_raw(*item) for item in wire)))

    async def flood_built(self, ticks: int, *, sequential: bool = True, packets_per_frame: int = 500) -> int:
        """The CPU-bound flood: as ``flood_line_rate``, but every packet is built as it is
        sent (a copy of the token's packet with a new last price, and the frame and its
        WebSocket header assembled around it, about a microsecond of CPU a packet) so that
        the feed competes for the cores as a real network stack and the other processes
        on a box do. Returns ticks sent."""
        targets = [s for s in self.sessions if s.modes]
        wire = [(s, self._built_chunks(s, ticks, packets_per_frame), ticks) for s in targets]
        if sequential:
            return sum([await self._write_raw(*item) for item in wire])
        return sum(await asyncio.gather(*(self._write_raw(*item) for item in wire)))

    def _built_chunks(self, session: Session, ticks: int, per_frame: int) -> Iterator[bytes]:
        """The session's frames on the wire, each built only when the last one was written."""
        now = int(time.time())
        pool = [codec.encode_packet(self.market.tick(t, m, now)) for t, m in session.modes.items()]
        price = struct.Struct(">i")  # the last price follows the token in every layout
        for start in range(0, ticks, per_frame):
            packets = []
            for i in range(start, min(ticks, start + per_frame)):
                packet = bytearray(pool[i % len(pool)])
                price.pack_into(packet, 4, 100_000 + i % 5_000)
                packets.append(packet)
            (chunk,), _ = _websocket_frames([(codec.encode_frame(packets), len(packets))], chunk=0)
            yield chunk

    async def _write_raw(self, session: Session, chunks: Iterable[bytes], ticks: int) -> int:
        session.flooding = True
        try:
            for chunk in chunks:  # whole frames only: nothing else may land inside one
                session.websocket.transport.write(chunk)
                await session.websocket.drain()  # waits while the socket's buffer is full
        except (ConnectionClosed, ConnectionError) as exc:
            log.warning("flood cut short session=%d close=%s", session.id, exc)
            return 0
        finally:
            session.flooding = False
            session.last_sent = time.monotonic()
        session.sent_ticks += ticks
        return ticks

    def _flood_frames(self, session: Session, ticks: int, per_frame: int) -> list[tuple[bytes, int]]:
        """Frames of ``ticks`` ticks in all for the session's instruments, prepared up front."""
        now = int(time.time())
        pool = [
            codec.encode_packet(self.market.tick(t, m, now))
            for _ in range(3)
            for t, m in session.modes.items()
        ]
        frames = []
        for start in range(0, ticks, per_frame):
            size = min(per_frame, ticks - start)
            chunk = [pool[(start + i) % len(pool)] for i in range(size)]
            frames.append((codec.encode_frame(chunk), size))
        return frames


def _websocket_frames(frames: list[tuple[bytes, int]], chunk: int = 1 << 20) -> tuple[list[bytes], int]:
    """Binary frames as a server writes them on the wire (FIN, opcode 2, no mask), joined
    into chunks of about ``chunk`` bytes that end on frame boundaries."""
    chunks: list[bytes] = []
    out: list[bytes] = []
    size = 0
    for frame, _ in frames:
        n = len(frame)
        if n < 126:
            header = bytes([0x82, n])
        elif n < 1 << 16:
            header = bytes([0x82, 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x82, 127]) + n.to_bytes(8, "big")
        out += (header, frame)
        size += len(header) + len(frame)
        if size >= chunk:
            chunks.append(b"".join(out))
            out, size = [], 0
    if out:
        chunks.append(b"".join(out))
    return chunks, sum(ticks for _, ticks in frames)


_ORDER_ACTIONS: dict[str, dict[str, type]] = {  # action -> its arguments and their types
    "place": {
        "tradingsymbol": str, "quantity": int, "exchange": str, "transaction_type": str, "order_type": str,
        "price": float, "product": str, "tag": str, "reject": str,
    },
    "fill": {"order_id": str, "quantity": int, "price": float},
    "modify": {"order_id": str, "quantity": int, "price": float},
    "cancel": {"order_id": str},
    "reject": {"order_id": str, "reason": str},
}  # fmt: skip


def _order_arguments(action: str, query: dict[str, str]) -> dict[str, Any]:
    known = _ORDER_ACTIONS.get(action)
    if known is None:
        raise OrderError(f"unknown action {action!r}: one of {', '.join(_ORDER_ACTIONS)}")
    unknown = set(query) - set(known)
    if unknown:
        raise OrderError(f"unknown argument(s) {', '.join(sorted(unknown))} for {action}")
    return {name: known[name](value) for name, value in query.items()}


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _tokens(value: object) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**32 for v in value
    ):
        raise ValueError("Invalid instrument tokens")
    return list(value)


def subscribed(server: TickerServer) -> dict[int, dict[int, str]]:
    """Session id -> that connection's subscriptions, for tests and logs."""
    return {s.id: dict(s.modes) for s in server.sessions}
