"""One Kite ticker socket as an owned task: connect, (re)subscribe, read, watchdog, backoff.

The connection owns what it has told Kite. ``apply`` takes a change planned by the
subscription book; after any reconnect every token is subscribed again and every mode
set again. A socket that delivers nothing, not even a heartbeat, for ``stall_timeout``
seconds is treated as dead: a ghost connection fails silently, so it must be cut.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from kitewire import messages
from kitewire.codec import MODES
from publisher.health import Health
from publisher.orders import Every
from publisher.subscriptions import ConnectionChange
from publisher.supervisor import supervised
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.connection")
# websockets logs the handshake's request line, access token included, at DEBUG: its logger
# for Kite sockets never goes below INFO, whatever KITEBUS_LOG_LEVEL says.
_WIRE_LOG = logging.getLogger("kitebus.connection.websocket")
_WIRE_LOG.setLevel(logging.INFO)

BATCH = 1000  # tokens per subscribe/unsubscribe/mode message

CONNECTING, LIVE, BACKOFF, AUTH_FAILED, STOPPED = "connecting", "live", "backoff", "auth_failed", "stopped"

FrameHandler = Callable[[bytes, int], int]
StatusHandler = Callable[[str, int, list[int], str], None]  # (status, connection, tokens, reason)
STREAM_LIVE, STREAM_STALE = "live", "stale"
_ALWAYS = asyncio.Event()
_ALWAYS.set()


def _ignore(*_: object) -> None:
    pass


class StalledError(Exception):
    """Nothing arrived on the socket for too long."""


class TextListener(Protocol):
    """Who takes a connection's text messages beside the connection's own figures (the
    order feed): called in the reader, synchronous, no I/O."""

    def opened(self, connection: KiteConnection) -> None: ...

    def closed(self, connection: KiteConnection) -> None: ...

    def order(self, connection: KiteConnection, data: dict[str, Any]) -> None: ...

    def malformed_text(self, connection: KiteConnection, reason: str) -> None: ...

    def kite_error(self, connection: KiteConnection, message: str) -> None: ...


class _NoListener:
    def opened(self, connection: KiteConnection) -> None:
        pass

    closed = opened

    def order(self, connection: KiteConnection, data: dict[str, Any]) -> None:
        pass

    def malformed_text(self, connection: KiteConnection, reason: str) -> None:
        pass

    def kite_error(self, connection: KiteConnection, message: str) -> None:
        pass


class KiteConnection:
    """Connection ``index`` of the publisher; ``start`` runs it until ``close``."""

    def __init__(
        self,
        index: int,
        ws_url: str,
        api_key: str,
        access_token: str | None,
        on_frame: FrameHandler,
        writable: asyncio.Event | None = None,
        on_status: StatusHandler | None = None,
        *,
        stall_timeout: float = 5.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        auth_retry: float = 60.0,
    ) -> None:
        self.index = index
        self.account = "default"  # the name of the Kite account (api_key) it belongs to
        self._ws_url, self._api_key = ws_url, api_key
        self._access_token = access_token
        self._secrets = {api_key}
        if access_token:
            self._secrets.add(access_token)
        self._wake = asyncio.Event()  # a new access token: stop waiting, connect now
        self._on_frame = on_frame
        self._writable = writable or _ALWAYS
        self._on_status = on_status or _ignore
        self.stream = STREAM_STALE  # what consumers are told: are this connection's ticks flowing?
        self.stall_timeout = stall_timeout
        self.backoff_base, self.backoff_cap, self.auth_retry = backoff_base, backoff_cap, auth_retry
        self.modes: dict[int, str] = {}  # what this connection holds (and tells Kite)
        self._socket: ClientConnection | None = None
        self._lock = asyncio.Lock()  # orders resubscription against live changes
        self.health = Health()  # the publisher's, once it is given one
        self._task: asyncio.Task[None] | None = None
        # figures for status and metrics
        self.state = STOPPED
        self.ticks = 0
        self.reconnects = 0
        self.last_message_at = 0.0
        self.last_error = ""
        self.auth_failed_at = 0.0  # when Kite first refused the access token (0: it does not)
        # Kite's text messages: order updates go to ``texts``; errors and messages are counted here
        self.texts: TextListener = _NoListener()
        self.kite_errors = 0
        self.kite_messages = 0
        self.last_kite_error = ""
        self.last_kite_error_at = 0.0  # epoch seconds
        self.last_kite_message = ""
        self._quiet_texts = Every(1.0)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        name = f"kite-connection-{self.index}"
        self._task = asyncio.create_task(supervised(name, self._run, self.health), name=name)

    def set_access_token(self, access_token: str) -> None:
        """Use this token from the next handshake on; a connection that is down or refused
        tries again at once. A live socket keeps going (Kite closes it at logout)."""
        self._access_token = access_token
        self._secrets.add(access_token)
        if self.state != LIVE:
            self._wake.set()

    @property
    def _url(self) -> str:
        return f"{self._ws_url}?{urlencode({'api_key': self._api_key, 'access_token': self._access_token})}"

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a new access token arrives."""
        self._wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def close(self) -> None:
        """Stop: close the socket cleanly and end the task."""
        await cancel_and_wait(self._task)
        self._task = None
        self.state = STOPPED
        self._set_stream(STREAM_STALE, "publisher stopped")

    # --- subscriptions -------------------------------------------------------------------

    async def apply(self, change: ConnectionChange) -> None:
        """Take a planned change; tell Kite now if live, else at the next (re)connect."""
        async with self._lock:
            for token in change.unsubscribe:
                self.modes.pop(token, None)
            self.modes.update(change.subscribe)
            self.modes.update(change.modes)
            self._on_status(self.stream, self.index, list(change.subscribe), "subscribed")
            socket = self._socket
            if socket is None or self.state != LIVE:
                return
            try:
                await _send_batches(socket, messages.unsubscribe, sorted(change.unsubscribe))
                await _send_batches(socket, messages.subscribe, list(change.subscribe))
                for mode, tokens in _by_mode({**change.subscribe, **change.modes}).items():
                    await _send_batches(socket, lambda batch, m=mode: messages.set_mode(m, batch), tokens)
            except ConnectionClosed:
                pass  # the reader sees it too and reconnects; the resubscription covers this change

    # --- the task ------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                if self._access_token is None:
                    self._fail(AUTH_FAILED, "no valid access token yet (see KITE_ACCESS_TOKEN_FILE)")
                    await self._pause(self.auth_retry)
                    continue
                if self.state != AUTH_FAILED:  # stays visible until a handshake succeeds
                    self.state = CONNECTING
                started = time.monotonic()
                try:
                    await self._session()
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status in (HTTPStatus.FORBIDDEN, HTTPStatus.UNAUTHORIZED):
                        self._fail(AUTH_FAILED, f"handshake refused: HTTP {status} (access token expired?)")
                        self.auth_failed_at = self.auth_failed_at or time.time()
                        log.error(
                            "connection=%d auth refused status=%d retry_in=%.0fs",
                            self.index, status, self.auth_retry,
                        )  # fmt: skip
                        await self._pause(self.auth_retry * random.uniform(0.9, 1.1))
                        attempt = 0
                        self.reconnects += 1
                        continue
                    self._fail(BACKOFF, f"handshake refused: HTTP {status}")
                    if status == HTTPStatus.TOO_MANY_REQUESTS:
                        # Kite's limit of 3 sockets per api_key: another holder's sockets (a
                        # leader stepping down) free up within seconds; try again at a steady
                        # pace rather than backing off to the cap.
                        await self._pause(max(1.0, self.backoff_base * 2) * random.uniform(0.5, 1.0))
                        self.reconnects += 1
                        continue
                except StalledError:
                    self._fail(BACKOFF, f"stalled: nothing received for {self.stall_timeout:g}s")
                except ConnectionClosed as exc:
                    self._fail(BACKOFF, f"closed: code {exc.rcvd.code if exc.rcvd else 1006}")
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    self._fail(BACKOFF, f"{exc.__class__.__name__}: {exc}"[:200])
                except Exception as exc:  # a bug: reconnect rather than die with the task
                    log.exception("connection=%d failed unexpectedly", self.index)
                    self._fail(BACKOFF, f"internal error: {exc.__class__.__name__}")
                if time.monotonic() - started > 30:
                    attempt = 0  # it was healthy for a while: start the backoff over
                delay = min(self.backoff_cap, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("connection=%d down error=%r retry_in=%.2fs", self.index, self.last_error, delay)
                await self._pause(delay)
                self.reconnects += 1
        finally:
            self._socket = None

    def _fail(self, state: str, error: str) -> None:
        for secret in self._secrets:  # an exception may quote the URL; never show credentials
            error = error.replace(secret, "***")
        self.state = state
        self.last_error = error
        self._socket = None
        self._set_stream(STREAM_STALE, error)

    def _set_stream(self, stream: str, reason: str) -> None:
        if stream != self.stream:
            self.stream = stream
            self._on_status(stream, self.index, list(self.modes), reason)

    async def _session(self) -> None:
        # No WebSocket keepalive pings: under a burst the pong queues behind megabytes of
        # frames and a healthy, busy socket would be cut. The silence watchdog below (Kite
        # sends a heartbeat when idle) is the liveness check.
        async with connect(
            self._url, open_timeout=10, ping_interval=None, close_timeout=2,
            max_size=2**23, max_queue=4, logger=_WIRE_LOG,
        ) as socket:  # fmt: skip
            self.last_message_at = time.time()
            async with self._lock:
                self._socket = socket
                modes = dict(self.modes)
                await _send_batches(socket, messages.subscribe, list(modes))
                for mode, tokens in _by_mode(modes).items():
                    await _send_batches(socket, lambda batch, m=mode: messages.set_mode(m, batch), tokens)
                self.state = LIVE
                self.auth_failed_at = 0.0
            log.info("connection=%d live tokens=%d", self.index, len(modes))
            self.texts.opened(self)
            try:
                await self._read(socket)
            finally:
                self.texts.closed(self)

    async def _read(self, socket: ClientConnection) -> None:
        """Read until the socket fails. While the sink asks for backpressure (``writable``
        cleared) nothing is read, TCP holds the data at Kite, and the wait is outside the
        stall watchdog: our own pause is never mistaken for a silent socket."""
        on_frame, writable = self._on_frame, self._writable
        while True:
            try:
                async with asyncio.timeout(self.stall_timeout):
                    message = await socket.recv()
            except TimeoutError:
                socket.transport.abort()  # a ghost socket would not answer a close handshake
                raise StalledError from None
            received_at_ns = time.time_ns()  # one clock read serves the tick stamps and the watchdog view
            self.last_message_at = received_at_ns / 1e9
            if self.stream != STREAM_LIVE:  # the first message since (re)subscribing
                self._set_stream(STREAM_LIVE, "data flowing")
            if isinstance(message, bytes):
                self.ticks += on_frame(message, received_at_ns)
                if not writable.is_set():
                    await writable.wait()
                continue
            self._take_text(message)

    def _take_text(self, message: str) -> None:
        event = messages.parse_server_text(message)
        if isinstance(event, messages.OrderUpdate):
            self.texts.order(self, event.data)
        elif isinstance(event, messages.Malformed):
            self.texts.malformed_text(self, event.reason)
        elif isinstance(event, messages.ServerError):
            self.kite_errors += 1
            self.last_error = self.last_kite_error = f"kite: {event.message}"[:200]
            self.last_kite_error_at = time.time()
            self.texts.kite_error(self, event.message)
            self._log_text(logging.WARNING, "error", event.message)
        elif isinstance(event, messages.ServerMessage):
            self.kite_messages += 1
            self.last_kite_message = event.message[:200]
            self._log_text(logging.INFO, "message", event.message)

    def _log_text(self, level: int, kind: str, text: str) -> None:
        """Kite's error and message texts, logged at most once a second per connection."""
        held_back = self._quiet_texts.allow(time.monotonic())
        if held_back is not None:
            more = f" (and {held_back} more texts since the last line)" if held_back else ""
            log.log(level, "connection=%d kite %s=%r%s", self.index, kind, text[:200], more)


async def _send_batches(
    socket: ClientConnection, build: Callable[[list[int]], str], tokens: list[int]
) -> None:
    for start in range(0, len(tokens), BATCH):
        await socket.send(build(tokens[start : start + BATCH]))


def _by_mode(modes: dict[int, str]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {mode: [] for mode in MODES}
    for token, mode in modes.items():
        grouped[mode].append(token)
    return {mode: tokens for mode, tokens in grouped.items() if tokens}
