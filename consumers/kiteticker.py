"""A drop-in for Kite's official ``KiteTicker``: the same calls and callbacks, fed by the bus.

Change one import and an existing strategy stops holding a Kite connection of its own::

    from consumers.kiteticker import KiteTicker     # was: from kiteconnect import KiteTicker

    kws = KiteTicker(api_key, access_token)         # credentials accepted and ignored
    kws.on_ticks = lambda ws, ticks: ...
    kws.on_connect = lambda ws, response: (ws.subscribe(tokens), ws.set_mode(ws.MODE_FULL, tokens))
    kws.connect(threaded=True)

The bus comes from the environment (``REDIS_URL``, ``KITEBUS_NAMESPACE``), or from the
keyword arguments ``redis_url=``/``namespace=``. Subscriptions are claims of one client id
(``kiteticker-<host>-<pid>``, or ``client=``), released when the ticker closes; they live
while the ticker heartbeats (across reconnects), so a process that dies without closing
loses them after ``KITEBUS_CLIENT_TIMEOUT`` (or ``client_timeout=``).

``on_order_update(ws, data)`` is called once per order update of the account, with Kite's
own dict, from the stream ``{ns}:orders``: the account whose api_key this is in
``KITEBUS_ACCOUNTS``, else the default one (or ``account=``). Updates from the first connect
on; after a reconnect to the bus, those that came meanwhile come too.

Where it cannot be the same: ``on_message`` is never called (the bus carries ticks and
order updates, not Kite's frames); ``response`` in ``on_connect`` is a dict describing
the bus; a token whose mode another client raised is delivered in the mode this ticker
asked for (the richer fields are left out), as Kite would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from config import Keys, SettingsError, load_client_timeout, load_settings
from config.keys import SERVING
from config.masking import mask_url
from consumers.control import ControlClient, ControlTimeout, SubscriptionRejected
from consumers.heartbeat import Heartbeat
from consumers.orders import OrderReader
from consumers.subscriber import StreamStatus, Tick, TickSubscriber
from rediswire import bus
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.kiteticker")

HEARTBEAT_STALE = 5.0  # seconds without a publisher heartbeat before the bus counts as down
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the release to be applied
_TIMES = ("last_trade_time", "exchange_timestamp")
_BUS_ONLY = ("received_at_ns", "seq", "epoch")
_FULL_ONLY = ("last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp", "depth")
_LTP_KEYS = ("tradable", "mode", "instrument_token", "last_price")
_RANK = {"ltp": 0, "quote": 1, "full": 2}


class BusDown(Exception):
    """Redis answers, but no publisher is running behind it."""


def default_client_id() -> str:
    """``kiteticker-<host>-<pid>``, with only the characters a client id may hold."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"kiteticker-{host}-{os.getpid()}"


def account_of(api_key: str | None) -> str:
    """The name of the account with this api_key in ``KITEBUS_ACCOUNTS`` (from the
    environment), else ``default``: the publisher's names for its accounts."""
    if not api_key:
        return "default"
    try:
        settings = load_settings()
    except SettingsError:
        return "default"
    name = next((a.name for a in settings.accounts if a.api_key.get_secret_value() == api_key), None)
    default_key = settings.kite_api_key.get_secret_value() if settings.kite_api_key else None
    if name is None and settings.accounts and api_key != default_key:
        # several accounts, and this key is none of theirs: the fills shown would be another's
        log.warning("api_key matches no account in KITEBUS_ACCOUNTS: on_order_update gets the default "
                    "account's order updates; set KITEBUS_ACCOUNTS or pass account=")  # fmt: skip
    return name or "default"


def as_official(tick: Tick, mode: str) -> Tick:
    """A bus tick as the official client delivers it in ``mode``: times as ``datetime``,
    without the bus's own keys (``received_at_ns``, ``seq``, ``epoch``), and only the
    fields of that mode."""
    tick = dict(tick)
    for key in _BUS_ONLY:
        tick.pop(key, None)
    if _RANK[tick["mode"]] > _RANK[mode]:
        if mode == "ltp":
            tick = {key: tick[key] for key in _LTP_KEYS}
        else:
            for key in _FULL_ONLY:
                tick.pop(key, None)
        tick["mode"] = mode
    for key in _TIMES:
        if key in tick:
            try:
                tick[key] = datetime.fromtimestamp(tick[key])
            except (OverflowError, OSError, ValueError):
                tick[key] = None  # as the official client does when conversion fails
    return tick


class KiteTicker:
    """The official ``KiteTicker``'s interface over the kitebus Redis bus."""

    MODE_FULL = "full"
    MODE_QUOTE = "quote"
    MODE_LTP = "ltp"

    def __init__(
        self,
        api_key: str | None = None,
        access_token: str | None = None,
        debug: bool = False,
        root: str | None = None,
        reconnect: bool = True,
        reconnect_max_tries: int = 50,
        reconnect_max_delay: int = 60,
        connect_timeout: int = 30,
        *,
        redis_url: str | None = None,
        namespace: str | None = None,
        client: str | None = None,
        redis_cluster: bool | None = None,
        client_timeout: float | None = None,
        account: str | None = None,
    ) -> None:
        del access_token, root  # the publisher holds Kite's connection
        self.account = account or account_of(api_key)  # whose order updates ``on_order_update`` gets
        if redis_url is None or namespace is None or redis_cluster is None:
            settings = load_settings()
            redis_url = redis_url or settings.redis_url
            namespace = namespace or settings.namespace
            redis_cluster = settings.redis_cluster if redis_cluster is None else redis_cluster
            client_timeout = settings.client_timeout if client_timeout is None else client_timeout
        self.client_timeout = load_client_timeout() if client_timeout is None else client_timeout
        self.redis_url = redis_url
        self.redis_cluster = redis_cluster
        self.keys = Keys(namespace)
        self.client = client or default_client_id()
        self.debug = debug
        self.reconnect = reconnect
        self.reconnect_max_tries = min(reconnect_max_tries, 300)
        self.reconnect_max_delay = max(reconnect_max_delay, 5)
        self.connect_timeout = connect_timeout
        self.subscribed_tokens: dict[int, str] = {}
        self.on_ticks: Callable[..., Any] | None = None
        self.on_open: Callable[..., Any] | None = None
        self.on_close: Callable[..., Any] | None = None
        self.on_error: Callable[..., Any] | None = None
        self.on_connect: Callable[..., Any] | None = None
        self.on_message: Callable[..., Any] | None = None  # never called: see the module docstring
        self.on_reconnect: Callable[..., Any] | None = None
        self.on_noreconnect: Callable[..., Any] | None = None
        self.on_order_update: Callable[..., Any] | None = None
        self._orders_after: str | None = None  # the last order update's entry id, across reconnects
        self.websocket_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: asyncio.Queue[tuple[str, list[int], str]] | None = None
        self._stop: asyncio.Event | None = None
        self._connected = False
        self._subscriber: TickSubscriber | None = None
        self._retry = True
        self._loop_thread = 0
        self._heartbeat: Heartbeat | None = None  # keeps the claims alive across reconnects
        self._claimed = False  # a claim was sent: closing releases the client's claims
        self._closing = False
        self._running = False
        self._done = threading.Event()  # the loop has ended and released

    # --- the official interface ------------------------------------------------------------

    def connect(
        self, threaded: bool = False, disable_ssl_verification: bool = False, proxy: Any = None
    ) -> None:
        """Join the bus. ``threaded=True`` returns at once (a thread of its own runs the
        ticker); otherwise this returns when the ticker is closed or gives up."""
        del disable_ssl_verification, proxy  # TLS and proxies are the Redis URL's business
        self._closing, self._running = False, True
        self._done.clear()
        if threaded:
            self.websocket_thread = threading.Thread(target=self._run, name="kiteticker", daemon=True)
            self.websocket_thread.start()
        else:
            self._run()

    def is_connected(self) -> bool:
        """On the bus, and none of this ticker's instruments is stale at the publisher."""
        sub = self._subscriber
        if not self._connected or sub is None:
            return False
        return not any(sub.status.get(t) == "stale" for t in self.subscribed_tokens)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Release this ticker's subscriptions and leave the bus (no reconnect).

        From any thread but the ticker's own it returns once the publisher has applied the
        release, waiting at most ``CLOSE_TIMEOUT`` s (a release written while no publisher
        runs waits in the control stream for the next), so the process may exit right
        after. From a callback it returns at once; the release follows the callback."""
        self._retry = False
        self._closing = True  # before reading the loop: a loop just starting sees it
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has just ended
                pass
        if self._running and threading.get_ident() != self._loop_thread:
            self._done.wait(CLOSE_TIMEOUT)

    def stop(self) -> None:
        """As the official client's ``stop``: end the ticker's loop for good."""
        self.close()

    def stop_retry(self) -> None:
        """No more reconnect attempts after the current connection ends."""
        self._retry = False

    def subscribe(self, instrument_tokens: Iterable[int]) -> bool:
        tokens = list(instrument_tokens)
        for token in tokens:
            self.subscribed_tokens[token] = self.MODE_QUOTE
        self._submit("subscribe", tokens, self.MODE_QUOTE)
        return True

    def unsubscribe(self, instrument_tokens: Iterable[int]) -> bool:
        tokens = list(instrument_tokens)
        for token in tokens:
            self.subscribed_tokens.pop(token, None)
        self._submit("unsubscribe", tokens, "")
        return True

    def set_mode(self, mode: str, instrument_tokens: Iterable[int]) -> bool:
        tokens = list(instrument_tokens)
        for token in tokens:
            self.subscribed_tokens[token] = mode
        self._submit("mode", tokens, mode)
        return True

    def resubscribe(self) -> None:
        """Claim every token in ``subscribed_tokens`` again, each in its mode."""
        self._claim(self.subscribed_tokens)

    def _claim(self, modes: dict[int, str]) -> None:
        by_mode: dict[str, list[int]] = {}
        for token, mode in modes.items():
            by_mode.setdefault(mode, []).append(token)
        for mode, tokens in by_mode.items():
            self._submit("subscribe", tokens, mode)

    # --- the loop --------------------------------------------------------------------------

    def _submit(self, op: str, tokens: list[int], mode: str) -> None:
        """Queue a request for the loop, from any thread. Before the first connect the
        tokens are only recorded, and claimed on connect."""
        loop, requests = self._loop, self._requests
        if loop is None or requests is None or not tokens:
            return
        if threading.get_ident() == self._loop_thread:
            requests.put_nowait((op, tokens, mode))
        else:
            loop.call_soon_threadsafe(requests.put_nowait, (op, tokens, mode))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._running = False
            self._done.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._requests = asyncio.Queue()
        self._stop = asyncio.Event()
        if self._closing:  # closed before the loop began
            self._stop.set()
        client = bus.connect(self.redis_url, self.redis_cluster, socket_connect_timeout=self.connect_timeout)
        self._heartbeat = Heartbeat(client, self.keys, self.client_timeout)
        try:
            await self._connect_and_serve()
        finally:
            await self._leave(client)
            self._loop = None

    async def _connect_and_serve(self) -> None:
        assert self._stop is not None
        attempts = 0
        while not self._stop.is_set():
            code, reason = 1000, "closed by the client"
            try:
                await self._session()
            except (RedisError, OSError, BusDown, ControlTimeout) as exc:
                code, reason = 1006, f"{exc.__class__.__name__}: {exc}"[:300]
                self._callback(self.on_error, code, reason)
            finally:
                was_connected, self._connected = self._connected, False
            if was_connected or code == 1000:
                self._callback(self.on_close, code, reason)
            if self._stop.is_set():
                break
            if not (self.reconnect and self._retry) or attempts >= self.reconnect_max_tries:
                self._callback(self.on_noreconnect)
                break
            attempts += 1
            self._callback(self.on_reconnect, attempts)
            delay = min(self.reconnect_max_delay, 0.5 * 2 ** (attempts - 1))
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def _leave(self, client: bus.Client) -> None:
        """The ticker is done: release every claim of its client (op ``release``), waiting
        for the publisher to apply it if one runs, stop the heartbeat; within CLOSE_TIMEOUT."""
        assert self._heartbeat is not None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT - 1):
                if self._claimed:
                    try:
                        await self._check_publisher(client)
                        wait = CLOSE_TIMEOUT - 1.5
                    except BusDown:
                        wait = 0.0  # the release waits in the stream for the next publisher
                    control = ControlClient(client, self.keys.ns, session=False)
                    try:
                        await control.request("release", None, client=self.client, timeout=wait)
                    except ControlTimeout:
                        log.info("release of %s written; a publisher applies it when it runs", self.client)
        except (RedisError, OSError, TimeoutError) as exc:  # they expire once the heartbeat stops
            log.warning(
                "could not release client %s (%s); its claims go %gs after its last heartbeat",
                self.client, exc, self.client_timeout,
            )  # fmt: skip
        finally:
            await self._heartbeat.aclose(timeout=1.0)
            await client.aclose()

    async def _session(self) -> None:
        """One connection to the bus: check it, announce it, then serve until stop or failure."""
        client = bus.connect(self.redis_url, self.redis_cluster, socket_connect_timeout=self.connect_timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._check_publisher(client)
            sub = TickSubscriber(
                client, self.client, namespace=self.keys.ns, release_on_exit=False, timeout=5.0,
                on_status=self._stream_changed, heartbeat=self._heartbeat,
            )  # fmt: skip
            self._subscriber = sub
            async with sub:
                # Where order updates start, fixed before on_connect: none after it is missed.
                orders = sub.order_updates(self._orders_after, account=self.account)
                await orders.start()
                self._connected = True
                held = dict(self.subscribed_tokens)  # on a reconnect: everything; first time: early calls
                self._callback(self.on_connect, {"bus": mask_url(self.redis_url), "client": self.client})
                self._claim(held)
                tasks = [
                    asyncio.create_task(self._serve_requests(sub)),
                    asyncio.create_task(self._deliver(sub)),
                    asyncio.create_task(self._deliver_orders(orders)),
                    asyncio.create_task(self._watch_publisher(client)),
                ]
                stop = asyncio.create_task(self._stop.wait())  # type: ignore[union-attr]
                try:
                    done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (*tasks, stop):
                        await cancel_and_wait(task)
                for task in done:
                    if task is not stop:
                        task.result()  # raises what ended the session
        finally:
            self._subscriber = None
            await client.aclose()

    def _stream_changed(self, event: StreamStatus) -> None:
        """The publisher lost (or got back) the Kite connection these instruments are on."""
        mine = [t for t in event.tokens if t in self.subscribed_tokens]
        if not mine:
            return
        if event.status == "stale":
            names = ",".join(map(str, mine))
            self._callback(self.on_error, 1006, f"stream stale for {names}: {event.reason}")
        else:
            log.info("stream live again tokens=%d", len(mine))

    async def _check_publisher(self, client: bus.Client) -> None:
        status = await client.hgetall(self.keys.status)
        state = status.get(b"state", b"").decode()
        age = time.time() - float(status.get(b"heartbeat_at", b"0") or 0)
        if state not in SERVING or age > HEARTBEAT_STALE:
            raise BusDown(
                f"no publisher running on the bus (namespace {self.keys.ns!r}, state {state or 'absent'}, "
                f"heartbeat {age:.0f}s ago)"
            )

    async def _watch_publisher(self, client: bus.Client) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._check_publisher(client)

    async def _serve_requests(self, sub: TickSubscriber) -> None:
        assert self._requests is not None
        while True:
            op, tokens, mode = await self._requests.get()
            self._claimed = True
            try:
                if op == "subscribe":
                    await sub.subscribe(tokens, mode=mode, wait_live=False)  # Kite's does not wait either
                elif op == "mode":
                    await sub.set_mode(tokens, mode)
                else:
                    await sub.unsubscribe(tokens)
            except SubscriptionRejected as exc:
                self._callback(self.on_error, 0, f"{op} rejected by the publisher: {exc}")

    async def _deliver(self, sub: TickSubscriber) -> None:
        while True:
            batch = await sub.batch()
            modes = self.subscribed_tokens
            ticks = [
                as_official(tick, modes[tick["instrument_token"]])
                for tick in batch
                if tick["instrument_token"] in modes
            ]
            if ticks:
                self._callback(self.on_ticks, ticks)

    async def _deliver_orders(self, reader: OrderReader) -> None:
        """``on_order_update(ws, data)`` for each of the account's updates; the entry id is
        kept, so the next session goes on after the last one delivered."""
        try:
            async for update in reader:
                self._callback(self.on_order_update, update.data)
        finally:
            self._orders_after = reader.last_id

    def _callback(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        """Call a user callback as the official client does: (ticker, *args); an exception in
        it is logged and the ticker goes on."""
        if callback is None:
            return
        try:
            callback(self, *args)
        except Exception:
            log.exception("kiteticker callback %s failed", getattr(callback, "__name__", callback))
