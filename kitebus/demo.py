"""``kitebus demo``: the whole system on one machine, with live ticks on screen.

Redis (``REDIS_URL`` when one answers there, else a private ``redis-server``), the
simulator, the publisher and a watchlist in mixed modes, all in this process; Ctrl-C
stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from redis.exceptions import RedisClusterException
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from config import Keys, Settings
from config.masking import mask_url
from consumers.control import ControlClient
from consumers.display import orders_table, watchlist_table
from consumers.status import connections_table, read_status
from consumers.subscriber import TickSubscriber
from kitebus.localredis import LocalRedis
from kitewire.instruments import write_csv
from publisher.app import Publisher
from rediswire import bus
from rediswire.tasks import cancel_and_wait
from simulator.market import INSTRUMENTS, instrument_for
from simulator.server import DEFAULT_ACCESS_TOKEN, DEFAULT_API_KEY, TickerServer

WATCHLIST: dict[str, list[int]] = {
    "full": [738561, 408065, 256265, 9001 << 8 | 2],
    "quote": [2953217, 341249, 1270529, 779521, 260105],
    "ltp": [424961, 884737, 9004 << 8 | 3, 9005 << 8 | 6],
}
DEMO_CLIENT = "demo"
ORDER_RATE = 0.5  # random order updates per second from the simulator
ORDERS_SHOWN = 5


@contextlib.asynccontextmanager
async def _redis_for_demo(settings: Settings, console: Console) -> AsyncIterator[tuple[str, str, int | None]]:
    """(url, namespace, private port): the configured Redis (a cluster with
    KITEBUS_REDIS_CLUSTER=1) if it answers, else a private one."""
    try:
        probe = bus.connect(
            settings.redis_url, settings.redis_cluster, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            await probe.ping()
        finally:
            await probe.aclose()
        reachable = True
    except (*bus.REDIS_DOWN, RedisClusterException):
        reachable = False
    if reachable:
        # A shared Redis: keep out of a real publisher's way unless a namespace was chosen.
        namespace = settings.namespace if "KITEBUS_NAMESPACE" in os.environ else "demo"
        console.print(f"kitebus demo: using the Redis at REDIS_URL, namespace '{namespace}'")
        yield settings.redis_url, namespace, None
        return
    server = LocalRedis()
    await asyncio.to_thread(server.start)
    assert server.process is not None
    console.print(
        f"kitebus demo: private redis-server on 127.0.0.1:{server.port} (pid {server.process.pid}, "
        f"dir {server.workdir})"
    )
    try:
        yield server.url, settings.namespace, server.port
    finally:
        await asyncio.to_thread(server.stop)


Samples = dict[int, deque[tuple[float, int]]]


def _live_rates(data: dict[str, Any], publisher: Publisher, rates: Samples) -> None:
    """Ticks/s per connection over the last ~3 s, from the publisher's own counters."""
    now = time.monotonic()
    for row, connection in zip(data["connections"], publisher.connections, strict=False):
        window = rates.setdefault(connection.index, deque(maxlen=8))
        window.append((now, connection.ticks))
        (then, first), (_, last) = window[0], window[-1]
        row["ticks"] = connection.ticks
        row["ticks_per_s"] = (last - first) / (now - then) if now > then else 0.0


def _help(
    url: str, namespace: str, port: int | None, instruments: Path, cluster: bool, simulator: str = ""
) -> Panel:
    cli = f"{Path(os.sys.executable).parent}/kitebus"
    cluster_flag = " KITEBUS_REDIS_CLUSTER=1" if cluster else ""
    shown_url = mask_url(url)
    masked_note = "  # password masked: put yours in" if shown_url != url else ""
    orders = simulator.replace("ws://", "http://") + "/orders" if simulator else ""  # the simulator's
    lines = [
        f"# symbols: the publisher loaded KITEBUS_INSTRUMENTS={instruments} into {namespace}:instruments",
        f"export REDIS_URL={shown_url} KITEBUS_NAMESPACE={namespace}" + cluster_flag + masked_note,
        f"{cli} status",
        f"{cli} ctl subscribe NSE:LT NSE:AXISBANK --mode full",
        f"{cli} tail NSE:INFY",
        f"{cli} tail --orders",
        *([f"curl '{orders}/place?tradingsymbol=INFY&quantity=10&price=1500'"] if orders else []),
        f"redis-cli{' -c' if cluster else ''}{f' -p {port}' if port else ''} HGETALL {namespace}:token_conn",
    ]
    return Panel(Text("\n".join(lines)), title="try in another terminal", title_align="left")


async def run_demo(settings: Settings, stop: asyncio.Event, duration: float | None = None) -> None:
    """Run until ``stop`` is set (or ``duration`` seconds pass)."""
    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="kitebus-demo-"))
    instruments = workdir / "instruments.csv"
    write_csv(instruments, [(i.token, i.exchange, i.symbol) for i in INSTRUMENTS])
    try:
        async with _redis_for_demo(settings, console) as (url, namespace, port):
            simulator_server = TickerServer(port=0, rate=2, seed=int(time.time()), order_rate=ORDER_RATE)
            async with simulator_server as simulator:
                demo_settings = settings.model_copy(update={
                    "kite_ws_url": simulator.url, "redis_url": url, "namespace": namespace,
                    "kite_api_key": SecretStr(DEFAULT_API_KEY),
                    "kite_access_token": SecretStr(DEFAULT_ACCESS_TOKEN), "instruments": str(instruments),
                    "redis_cluster": settings.redis_cluster and port is None,
                })  # fmt: skip
                publisher = Publisher(demo_settings)
                await publisher.start()
                try:
                    await _show(publisher, url, namespace, port, instruments, console, stop, duration)
                finally:
                    await publisher.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("kitebus demo: stopped; everything it started is gone")


async def _show(
    publisher: Publisher, url: str, namespace: str, port: int | None, instruments: Path,
    console: Console, stop: asyncio.Event, duration: float | None,
) -> None:  # fmt: skip
    cluster = publisher.settings.redis_cluster
    client = bus.connect(url, cluster)
    keys = Keys(namespace)
    symbols = {}
    for tokens in WATCHLIST.values():
        for token in tokens:
            instrument = instrument_for(token)
            symbols[token] = f"{instrument.exchange}:{instrument.symbol}"
    latest: dict[int, dict[str, Any]] = {}
    orders: deque[Any] = deque(maxlen=ORDERS_SHOWN)  # the latest order updates, newest last
    control = ControlClient(client, namespace)
    try:
        for mode, tokens in WATCHLIST.items():
            await control.subscribe(tokens, mode=mode, client=DEMO_CLIENT)
        async with TickSubscriber(client, client="demo-screen", namespace=namespace) as screen:
            await screen.listen(list(symbols))

            async def follow() -> None:
                async for tick in screen:
                    latest[tick["instrument_token"]] = tick

            async def follow_orders() -> None:
                async for update in screen.order_updates():
                    orders.append(update)

            reader = asyncio.create_task(follow())
            order_reader = asyncio.create_task(follow_orders())
            rates: Samples = {}
            deadline = None if duration is None else time.monotonic() + duration
            help_panel = _help(url, namespace, port, instruments, cluster, publisher.settings.kite_ws_url)
            try:
                with Live(console=console, refresh_per_second=4, screen=False) as live:
                    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                        data = await read_status(client, keys, sample=0)
                        _live_rates(data, publisher, rates)
                        totals = data["totals"]
                        header = Text(
                            f"kitebus demo: simulator {publisher.settings.kite_ws_url} -> publisher -> Redis "
                            f"[{namespace}]  tokens {totals['tokens']}/{totals['capacity']}, "
                            f"published {data['publisher']['published']:,}   (Ctrl-C to stop)"
                        )
                        table = watchlist_table(
                            latest, symbols, publisher.book.placement, publisher.book.in_force, screen.status
                        )
                        screens = (header, table, orders_table(orders), connections_table(data), help_panel)
                        live.update(Group(*screens))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)
            finally:
                await cancel_and_wait(order_reader)
                await cancel_and_wait(reader)
        await control.unsubscribe([t for tokens in WATCHLIST.values() for t in tokens], client=DEMO_CLIENT)
    finally:
        await control.aclose()
        await client.aclose()
