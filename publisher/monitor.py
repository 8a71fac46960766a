"""Health as data: ``{ns}:status`` and ``{ns}:conn:{i}`` about once a second, and an
optional Prometheus text endpoint with the same figures."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from config.keys import Keys
from kitewire.encoder import SPEEDUPS
from publisher.access_token import AccessTokenSource
from publisher.connection import LIVE, KiteConnection
from publisher.health import Health
from publisher.instruments import InstrumentsLoader
from publisher.lease import Fence, Lease
from publisher.order_feed import OrderFeed
from publisher.sink import TickSink
from publisher.subscriptions import SubscriptionBook
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.monitor")


class Monitor:
    """Owns the status task; ``on_redis_reset`` runs when Redis comes back empty-handed
    (a restart or failover: a new run_id) so every hash can be rewritten."""

    def __init__(
        self,
        client: bus.Client,
        keys: Keys,
        book: SubscriptionBook,
        connections: Sequence[KiteConnection],
        sink: TickSink,
        on_redis_reset: Callable[[], Awaitable[None]],
        epoch: int = 0,
        *,
        interval: float = 1.0,
        access_token: AccessTokenSource | None = None,
        instruments: InstrumentsLoader | None = None,
        fence: Fence | None = None,
        lease: Lease | None = None,
        health: Health | None = None,
        problems: Callable[[], dict[str, str]] | None = None,
        orders: OrderFeed | None = None,
    ) -> None:
        """``problems``: what each component says is wrong now (name -> reason, "" for
        nothing), taken into ``health`` at every round."""
        self._redis = client
        self._keys = keys
        self.book = book
        self.connections = connections
        self.sink = sink
        self._on_redis_reset = on_redis_reset
        self.epoch = epoch
        self.access_token = access_token
        self.instruments = instruments
        self.lease = lease
        self._fence = fence or lease or Fence()
        self.health = health or Health()
        self._problems = problems or dict
        self.orders = orders
        self.interval = interval
        self.started_at = time.time()
        self.state = "starting"
        self.redis_up = False
        self._run_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._metrics_server: object | None = None

    def status_fields(self) -> dict[str, str]:
        sink = self.sink
        return {
            "pid": str(os.getpid()),
            "started_at": f"{self.started_at:.3f}",
            "epoch": str(self.epoch),
            "heartbeat_at": f"{time.time():.3f}",
            "tokens": str(len(self.book.placement)),
            "capacity": str(self.book.capacity),
            "state": "degraded" if self.state == "running" and self.health.degraded else self.state,
            "degraded": "1" if self.health.degraded else "0",
            "degraded_reason": self.health.reason,
            "degraded_since": f"{self.health.degraded_since:.3f}",
            "failed_reason": self.health.fatal_reason,
            "task_restarts": str(self.health.task_restarts),
            "heartbeat_interval": f"{self.interval:g}",
            "connections": str(len(self.connections)),
            "live_connections": str(sum(c.state == LIVE for c in self.connections)),
            "clients": str(len(self.book.claims)),
            "published": str(sink.published),
            "conflated": str(sink.conflated),
            "dropped": str(sink.dropped),
            "malformed": str(sink.malformed),
            "unclaimed": str(sink.unclaimed),
            "write_errors": str(sink.write_errors),
            "buffered": str(sink.buffered),
            "backpressure": "1" if not sink.writable.is_set() else "0",
            "pauses": str(sink.pauses),
            "cached": str(len(sink.cache)),
            "speedups": "1" if SPEEDUPS else "0",
            "access_token_error": self.access_token.error if self.access_token else "",
            "access_token_changed_at": f"{self.access_token.changed_at:.3f}" if self.access_token else "0",
            "redis_reconnects": str(sink.redis_reconnects),
            "redis_redirects": str(sink.redirects),
            **self._instruments_fields(),
            **self._lease_fields(),
            **self._order_fields(),
        }

    def _order_fields(self) -> dict[str, str]:
        orders = self.orders
        if orders is None:
            return {}
        return {
            "order_updates": str(orders.published), "order_duplicates": str(orders.duplicates),
            "order_malformed": str(orders.malformed), "order_given_up": str(orders.given_up),
            "order_buffered": str(orders.buffered),
        }  # fmt: skip

    def _lease_fields(self) -> dict[str, str]:
        lease = self.lease
        if lease is None:
            return {}
        since = f"{lease.since:.3f}"
        return {
            "leader": lease.identity, "leader_fence": str(lease.fence), "leader_since": since,
            "lease_lapses": str(lease.lapses),
        }  # fmt: skip

    def _instruments_fields(self) -> dict[str, str]:
        loader = self.instruments
        if loader is None or not loader.source:
            return {"instruments": "0", "instruments_loaded_at": "0", "instruments_error": ""}
        return {
            "instruments": str(loader.count),
            "instruments_loaded_at": f"{loader.loaded_at:.3f}",
            "instruments_error": loader.error,
        }

    @staticmethod
    def connection_fields(connection: KiteConnection) -> dict[str, str]:
        return {
            "state": connection.state,
            "account": connection.account,
            "tokens": str(len(connection.modes)),
            "ticks": str(connection.ticks),
            "reconnects": str(connection.reconnects),
            "last_message_at": f"{connection.last_message_at:.3f}",
            "last_error": connection.last_error,
            "auth_failed_at": f"{connection.auth_failed_at:.3f}" if connection.auth_failed_at else "",
            "kite_errors": str(connection.kite_errors),
            "kite_messages": str(connection.kite_messages),
            "last_kite_error": connection.last_kite_error,
            "last_kite_error_at": f"{connection.last_kite_error_at:.3f}" if connection.kite_errors else "",
            "last_kite_message": connection.last_kite_message,
        }

    async def write(self) -> None:
        """Write the status and connection hashes now."""
        async with bus.fenced(self._redis, self._fence) as pipe:
            pipe.hset(self._keys.status, mapping=self.status_fields())
            for connection in self.connections:
                pipe.hset(self._keys.conn(connection.index), mapping=self.connection_fields(connection))
            await pipe.execute()

    async def check_redis(self) -> None:
        """Notice a Redis that restarted (new run_id) or came back, and have it rewritten."""
        run_id = await bus.run_id(self._redis)
        came_back = not self.redis_up
        self.redis_up = True
        if self._run_id is not None and (run_id != self._run_id or came_back):
            log.warning(
                "redis is back (run_id %s); rewriting every hash",
                "changed" if run_id != self._run_id else "same",
            )
            await self._on_redis_reset()
        self._run_id = run_id

    # --- the task ------------------------------------------------------------------------

    def start(self, metrics_port: int = 0, metrics_host: str = "127.0.0.1") -> None:
        if metrics_port:
            registry = CollectorRegistry()
            registry.register(_Metrics(self))
            self._metrics_server, _ = start_http_server(metrics_port, metrics_host, registry)
            log.info("metrics endpoint port=%d", metrics_port)
        self._task = asyncio.create_task(supervised("monitor", self._run, self.health), name="monitor")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server = None

    def _take_problems(self) -> None:
        problems = self._problems()
        lease = self.lease
        if lease is not None and lease.lapsed:
            problems["lease"] = f"lapsed {lease.lapsed_for:.1f}s ago: writes paused until it is renewed"
        elif lease is not None:
            problems["lease"] = ""
        for component, reason in problems.items():
            if reason:
                self.health.fault(component, reason)
            else:
                self.health.clear(component)

    async def _run(self) -> None:
        while True:
            self.sink.prune(self.book.placement)
            self._take_problems()
            try:
                if not self._fence.valid():  # lapsed, or another publisher leads: write nothing
                    self.redis_up = False  # rewrite every hash once the lease is renewed
                    await asyncio.sleep(self.interval)
                    continue
                await self.check_redis()
                await self.write()
                self.health.clear("status")
            except REDIS_FAULTS as exc:
                if self.redis_up:
                    log.warning("monitor lost redis error=%s", bus.describe(exc))
                self.health.fault("status", bus.describe(exc))
                self.redis_up = False
            await asyncio.sleep(self.interval)


class _Metrics(Collector):
    """Prometheus figures read from the same objects as the status hashes."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        monitor, sink = self._monitor, self._monitor.sink
        ticks = CounterMetricFamily("kitebus_ticks", "Ticks received", labels=["connection"])
        reconnects = CounterMetricFamily("kitebus_reconnects", "Reconnects", labels=["connection"])
        live = GaugeMetricFamily("kitebus_connection_live", "1 when live", labels=["connection"])
        tokens = GaugeMetricFamily("kitebus_connection_tokens", "Tokens held", labels=["connection"])
        age = GaugeMetricFamily(
            "kitebus_last_message_age_seconds", "Seconds since the last message", labels=["connection"]
        )
        now = time.time()
        for connection in monitor.connections:
            label = [str(connection.index)]
            ticks.add_metric(label, connection.ticks)
            reconnects.add_metric(label, connection.reconnects)
            live.add_metric(label, 1.0 if connection.state == LIVE else 0.0)
            tokens.add_metric(label, len(connection.modes))
            if connection.last_message_at:
                age.add_metric(label, now - connection.last_message_at)
        kite_errors = CounterMetricFamily(
            "kitebus_kite_errors", "Kite's error texts received", labels=["connection"]
        )
        kite_messages = CounterMetricFamily(
            "kitebus_kite_messages", "Kite's message texts received", labels=["connection"]
        )
        for connection in monitor.connections:
            kite_errors.add_metric([str(connection.index)], connection.kite_errors)
            kite_messages.add_metric([str(connection.index)], connection.kite_messages)
        yield from (ticks, reconnects, live, tokens, age, kite_errors, kite_messages)
        if monitor.orders is not None:
            yield from _order_metrics(monitor.orders)
        yield CounterMetricFamily("kitebus_published_ticks", "Ticks published to Redis", value=sink.published)
        yield CounterMetricFamily(
            "kitebus_conflated_ticks", "Ticks given up under overload, each token's newest kept",
            value=sink.conflated,
        )  # fmt: skip
        yield CounterMetricFamily("kitebus_dropped_ticks", "Ticks lost in failed writes", value=sink.dropped)
        yield GaugeMetricFamily(
            "kitebus_backpressure", "1 while the connections wait for Redis",
            value=float(not sink.writable.is_set()),
        )  # fmt: skip
        yield CounterMetricFamily("kitebus_backpressure_pauses", "Backpressure pauses", value=sink.pauses)
        yield CounterMetricFamily(
            "kitebus_malformed_packets", "Packets skipped as malformed", value=sink.malformed
        )
        yield CounterMetricFamily(
            "kitebus_unclaimed_packets", "Packets of tokens no client claims, not published",
            value=sink.unclaimed,
        )  # fmt: skip
        yield CounterMetricFamily(
            "kitebus_redis_write_errors", "Error replies to tick writes", value=sink.write_errors
        )
        yield CounterMetricFamily(
            "kitebus_redis_redirects", "Cluster redirects (MOVED, ASK, ...) met by tick writes",
            value=sink.redirects,
        )
        yield GaugeMetricFamily("kitebus_buffered_ticks", "Ticks waiting for Redis", value=sink.buffered)
        yield GaugeMetricFamily(
            "kitebus_redis_up", "1 when the tick writer has Redis", value=float(sink.redis_up)
        )
        yield GaugeMetricFamily("kitebus_tokens", "Tokens subscribed", value=len(monitor.book.placement))
        yield GaugeMetricFamily("kitebus_capacity", "Tokens that fit", value=monitor.book.capacity)
        yield GaugeMetricFamily(
            "kitebus_degraded", "1 while a component is in trouble or a task restarts",
            value=float(monitor.health.degraded),
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "kitebus_task_restarts", "Restarts of a long-lived task after it crashed", labels=["task"]
        )
        for task, count in sorted(monitor.health.restarts.items()):
            restarts.add_metric([task], count)
        yield restarts


_ORDER_COUNTERS = (
    ("kitebus_order_updates", "Distinct order updates written to the stream and the channel", "published"),
    ("kitebus_order_duplicates", "Order updates dropped: copies another socket brought first", "duplicates"),
    ("kitebus_order_malformed", "Kite texts that are not Kite's JSON (an order without order_id, ...)",
     "malformed"),
    ("kitebus_order_given_up", "Order updates given up (buffer full, lease lost, stopped)", "given_up"),
)  # fmt: skip


def _order_metrics(orders: OrderFeed) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    for name, text, attribute in _ORDER_COUNTERS:
        yield CounterMetricFamily(name, text, value=getattr(orders, attribute))
    yield GaugeMetricFamily("kitebus_order_buffered", "Order updates not written yet", value=orders.buffered)
