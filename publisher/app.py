"""Wiring: start in order, stop in reverse order.

``run``: stand by until this process holds the namespace's lease (``standby.py``), lead
until stopped or the lease is lost, then stand by again.
Start: Redis reachable -> claims restored into the book -> hashes rewritten -> tick sink
-> order feed -> connections (each already knows its tokens) -> monitor -> instruments ->
control loop.
So every subscription is back, and symbols resolve, before a new request is taken.
Stop: control loop -> connections (close frames) -> order feed (drained for a moment) ->
hashes cleared, status ``stopped`` -> monitor -> sink (drained for a moment) -> Redis. A
publisher that lost its lease closes its Kite sockets first and writes nothing more.

Every long-lived task runs under ``tasks.supervised``: a crash is restarted on the same
objects (``degraded`` meanwhile); a task that keeps crashing makes ``run`` stop the
publisher and raise ``PublisherFailed`` (``kitebus publish`` exits 1 with the reason).

Redis away or saying no ends nothing: every writer waits it out with its own backoff and
reports it (``health.py``); a lapsed lease pauses every write until it is renewed, and
only a lease another publisher holds ends the term (``lease.py``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from config import Keys, Settings, SettingsError, load_settings
from config.logs import configure_logging
from kitewire.encoder import Encoder
from publisher.access_token import AccessTokenSource
from publisher.connection import KiteConnection
from publisher.control import ControlLoop
from publisher.handover import Handover
from publisher.health import Health
from publisher.instruments import InstrumentsLoader
from publisher.lease import Lease
from publisher.live import LiveWatch
from publisher.memory import tune_memory
from publisher.monitor import Monitor
from publisher.moves import Moves
from publisher.order_feed import OrderFeed
from publisher.rebalance import Rebalancer
from publisher.sink import TickSink
from publisher.standby import Standby
from publisher.subscriptions import SubscriptionBook
from publisher.supervisor import PublisherFailed
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import Backoff, cancel_and_wait, run_until, run_until_signal

log = logging.getLogger("kitebus.publisher")
T = TypeVar("T")


@dataclass(frozen=True)
class Tuning:
    """Timings that tests shorten; the defaults suit Kite."""

    stall_timeout: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    auth_retry: float = 60.0
    status_interval: float = 1.0
    max_backlog: int = 4 << 20  # bytes of unsent ticks before the connections pause
    conflate_after: float = 1.0  # seconds over that bound before ticks are conflated
    live_timeout: float = 10.0  # seconds a new token may take to tick before it is named silent
    settle: float = 5.0  # seconds a restarted task must run to count as working again
    max_restarts: int = 5  # crashes of one task within restart_window before the process gives up
    restart_window: float = 60.0
    instruments_timeout: float = 120.0  # seconds for a whole fetch of KITEBUS_INSTRUMENTS


class Publisher:
    """The whole publisher. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        tuning: Tuning = Tuning(),
        encoder: Encoder | None = None,
        lease: Lease | None = None,
    ) -> None:
        """``lease``: the namespace's leadership, when this publisher may lose it to another."""
        accounts = settings.require_accounts()
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = bus.connect(
            settings.redis_url, settings.redis_cluster, socket_connect_timeout=5, health_check_interval=10
        )
        self.book = SubscriptionBook(settings.total_connections, settings.tokens_per_connection)
        self.epoch = time.time_ns() // 1_000_000  # tells a consumer a restart from a gap
        self.lease = lease
        self.health = Health(
            max_restarts=tuning.max_restarts, restart_window=tuning.restart_window, settle=tuning.settle
        )
        self.sink = TickSink(
            settings.redis_url, self.keys, encoder=encoder, epoch=self.epoch,
            max_backlog=tuning.max_backlog, conflate_after=tuning.conflate_after, fence=lease,
            cluster=settings.redis_cluster, claimed=self.book.placement,
        )  # fmt: skip
        publish = self.sink.publish_frame
        # Order updates from every socket of each account, once each, onto {ns}:orders.
        self.orders = OrderFeed(
            self.redis, self.keys, cluster=settings.redis_cluster, fence=lease,
            notice=self.sink.publish_notice,
        )  # fmt: skip
        self.moves = Moves()  # tokens moving between connections in a rebalance
        # Each account (api_key) has KITEBUS_CONNECTIONS connections of its own, numbered on
        # from the previous account's; the book places tokens over all of them.
        self.connections: list[KiteConnection] = []
        self.access_tokens: list[AccessTokenSource] = []
        for name, api_key, access_token, token_file in accounts:
            first = len(self.connections)
            source = AccessTokenSource(access_token, token_file, partial(self._new_access_token, first))
            self.access_tokens.append(source)
            for index in range(first, first + settings.connections):
                connection = KiteConnection(
                    index,
                    settings.kite_ws_url,
                    api_key,
                    source.access_token,
                    self.moves.handler(index, publish),
                    self.sink.writable,
                    self.sink.publish_status,
                    stall_timeout=tuning.stall_timeout,
                    backoff_base=tuning.backoff_base,
                    backoff_cap=tuning.backoff_cap,
                    auth_retry=tuning.auth_retry,
                )
                connection.account = name
                connection.texts = self.orders
                self.connections.append(connection)
        self.access_token = self.access_tokens[0]  # the default account's
        self.live = LiveWatch(self.redis, self.keys, self.sink, timeout=tuning.live_timeout, fence=lease)
        self.rebalancer = Rebalancer(
            self.redis, self.keys, self.book, self.connections, self.moves, timeout=tuning.live_timeout,
            fence=lease, health=self.health,
        )  # fmt: skip
        self.instruments = InstrumentsLoader(
            self.redis, self.keys, settings.instruments, timeout=tuning.instruments_timeout
        )
        self.control = ControlLoop(
            self.redis, self.keys, self.book, self.connections, live=self.live,
            rebalancer=self.rebalancer, moves=self.moves, instruments=self.instruments, fence=lease,
            client_timeout=settings.client_timeout,
        )  # fmt: skip
        self.monitor = Monitor(
            self.redis, self.keys, self.book, self.connections, self.sink, self._redis_reset, self.epoch,
            interval=tuning.status_interval, access_token=self.access_token, instruments=self.instruments,
            fence=lease, lease=lease, health=self.health, problems=self._problems, orders=self.orders,
        )  # fmt: skip
        self.handover = Handover(self.redis, self.keys, lease, self.connections) if lease else None
        # Every long-lived task runs under tasks.supervised, which reports to this Health.
        for part in (self.sink, self.orders, self.live, self.instruments, self.control, self.handover,
                     *self.connections, *self.access_tokens):  # fmt: skip
            if part is not None:
                part.health = self.health

    def _problems(self) -> dict[str, str]:
        """What each part of the publisher says is wrong now (for ``health``)."""
        return {
            "ticks": self.sink.problem, "control": self.control.problem, "live": self.live.problem,
            "orders": self.orders.problem,
        }  # fmt: skip

    async def _redis_reset(self) -> None:
        """Redis came back without its data: rewrite every hash, load the instruments again."""
        await self.control.write_all()
        self.instruments.reload()

    def _new_access_token(self, first: int, access_token: str) -> None:
        """A new access token for the account whose connections start at ``first``."""
        for connection in self.connections[first : first + self.settings.connections]:
            connection.set_access_token(access_token)

    async def start(self) -> None:
        for source in self.access_tokens:
            source.start()
        plan, dropped = self.book.restore(*await self._retried(self.control.load_claims))
        for index, change in plan.items():
            await self.connections[index].apply(change)
        await self._retried(lambda: self.control.drop_claims(dropped))
        await self._retried(self.control.write_all)
        await self._retried(self.control.ensure_group)
        log.info(
            "restored tokens=%d clients=%d capacity=%d",
            len(self.book.placement), len(self.book.claims), self.book.capacity,
        )  # fmt: skip
        self.sink.start()
        self.orders.start()
        for connection in self.connections:
            connection.start()
        if self.handover is not None:
            self.handover.start()
        self.monitor.state = "running"
        self.monitor.start(self.settings.metrics_port)
        self.live.start()
        # Ticks flow meanwhile; a bad or slow source is reported, never the end of the start.
        await self._retried(self.instruments.load)  # before any request: symbols in pending ones resolve
        self.instruments.start()
        self.control.start()

    async def stop(self) -> None:
        """Stop in order. A publisher that lost its lease closes its Kite sockets first and
        writes nothing more: the hashes are the new leader's."""
        deposed = self.lease is not None and not self.lease.valid()
        if deposed:
            await asyncio.gather(*(connection.close() for connection in self.connections))
        self.monitor.state = "stopping"
        if self.handover is not None:
            await self.handover.close()
        await self.control.close()
        await self.rebalancer.close()
        await self.instruments.close()
        await self.live.close()
        for connection in self.connections:
            await connection.close()
        await self.orders.close(flush_timeout=0 if deposed else 2.0)  # what Kite sent last, written
        self.monitor.state = "failed" if self.health.fatal.is_set() else "stopped"
        await self.monitor.close()
        if deposed:
            await self._close_quietly()
            return
        try:
            async with asyncio.timeout(3):
                async with bus.fenced(self.redis, self.lease) as pipe:
                    pipe.delete(self.keys.token_conn)
                    pipe.delete(self.keys.token_mode)
                    pipe.hset(self.keys.status, mapping=self.monitor.status_fields())
                    for connection in self.connections:
                        pipe.hset(
                            self.keys.conn(connection.index),
                            mapping=self.monitor.connection_fields(connection),
                        )
                    await pipe.execute()
        except (*REDIS_FAULTS, TimeoutError) as exc:
            log.warning("could not mark status stopped error=%s", bus.describe(exc))
        await self._close_quietly()

    async def _close_quietly(self) -> None:
        await self.sink.close()
        for source in self.access_tokens:
            await source.close()
        await self.redis.aclose()
        log.info("stopped")

    async def _retried(self, step: Callable[[], Awaitable[T]]) -> T:
        """A start-up step, retried while Redis is away or says no."""
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                return await step()
            except REDIS_FAULTS as exc:
                log.warning("waiting for redis to start error=%s", bus.describe(exc))
                await backoff.wait()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Stand by until this process leads the namespace, lead until ``stop`` is set or the
    lease is lost, and stand by again after a loss; a stop at any point is honoured."""
    client = bus.connect(
        settings.redis_url, settings.redis_cluster, socket_connect_timeout=5, socket_timeout=5
    )
    lease = Lease(client, Keys(settings.namespace))
    standby = Standby(client, settings, lease)
    try:
        while await standby.wait_for_lease(stop):
            try:
                await bus.require_version(client)
            except bus.RedisTooOld:
                await lease.close(release=True)
                raise
            await _lead(settings, lease, stop)
    finally:
        await client.aclose()


async def _lead(settings: Settings, lease: Lease, stop: asyncio.Event) -> None:
    publisher = Publisher(settings, lease=lease)
    lease.start(publisher.health)
    ended = asyncio.Event()  # stop, the lease lost, or a task that keeps crashing
    watcher = asyncio.create_task(_first_of(ended, stop, lease.lost, publisher.health.fatal))
    started = time.monotonic()
    try:
        await run_until(publisher.start(), ended)
        if not ended.is_set():
            log.info("running in %.2fs", time.monotonic() - started)
            await ended.wait()
    finally:
        await cancel_and_wait(watcher)
        await publisher.stop()
        await lease.close(release=not lease.lost.is_set())
    if publisher.health.fatal.is_set():
        raise PublisherFailed(publisher.health.fatal_reason)


async def _first_of(ended: asyncio.Event, *events: asyncio.Event) -> None:
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        ended.set()
    finally:
        for wait in waits:
            await cancel_and_wait(wait)


def main() -> int:
    """``kitebus publish`` (and ``python -m publisher``): run until SIGINT/SIGTERM. 0 after
    a requested stop, 1 when a task kept crashing (so that compose or systemd restarts the
    process), 2 on a bad setting."""
    try:
        settings = load_settings()
        settings.require_credentials()
    except SettingsError as exc:
        print(f"kitebus: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    tune_memory()
    try:
        run_until_signal(lambda stop: run(settings, stop))
    except PublisherFailed as exc:
        print(f"kitebus publish: failed: {exc}", file=sys.stderr)
        return 1
    except bus.RedisTooOld as exc:
        print(f"kitebus publish: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
