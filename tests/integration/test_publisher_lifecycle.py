"""The publisher as a process (signals, restart) and with Redis going away under it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request

import msgpack
import redis.asyncio as redis

from config import Keys
from consumers.control import ControlClient
from kitebus.localredis import LocalRedis, free_port
from publisher.app import Publisher, Tuning
from simulator.server import subscribed
from tests.integration.conftest import eventually

EQUITY, INDEX = 408065, 256265


async def _start_process(simulator, redis_url: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ, "KITE_WS_URL": simulator.url, "REDIS_URL": redis_url,
        "KITE_API_KEY": "kitebus", "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": "kite",
    }  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "publisher", env=env, stderr=asyncio.subprocess.PIPE
    )


async def _state(rds: redis.Redis, keys: Keys) -> bytes | None:
    return await rds.hget(keys.status, "state")


async def test_sigterm_stops_cleanly_and_a_restart_restores_everything(
    simulator, redis_url, rds, keys, control
):
    proc = await _start_process(simulator, redis_url)
    try:
        await eventually(lambda: _running(rds, keys), timeout=20)
        await control.subscribe([EQUITY], mode="full", client="a")
        await eventually(lambda: any(m.get(EQUITY) == "full" for m in subscribed(simulator).values()))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - started < 5
        assert await _state(rds, keys) == b"stopped"
        assert await rds.exists(keys.token_conn, keys.token_mode) == 0
        assert await rds.hgetall(keys.claims("a")) == {str(EQUITY).encode(): b"full"}
        await eventually(lambda: not simulator.sessions)  # its sockets are closed

        # written while no publisher runs: applied on the next start
        entry = (
            await rds.xadd(
                keys.control, {"op": "subscribe", "tokens": str(INDEX), "mode": "ltp", "client": "b"}
            )
        ).decode()
        proc = await _start_process(simulator, redis_url)
        await eventually(lambda: _running(rds, keys), timeout=20)

        async def both_live():
            return await rds.hgetall(keys.token_mode) == {
                str(EQUITY).encode(): b"full",
                str(INDEX).encode(): b"ltp",
            }

        await eventually(both_live)
        results = {f[b"request"]: f for _, f in await rds.xrange(keys.control_results)}
        assert results[entry.encode()][b"ok"] == b"1"
        await eventually(
            lambda: sorted(t for m in subscribed(simulator).values() for t in m) == [INDEX, EQUITY]
        )
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _running(rds: redis.Redis, keys: Keys) -> bool:
    return await _state(rds, keys) == b"running"


async def test_redis_restart_under_a_running_publisher(simulator, settings, tmp_path) -> None:
    server = LocalRedis(tmp_path, port=free_port())
    server.start()
    settings = settings.model_copy(update={"redis_url": server.url})
    keys = Keys("kite")
    tuning = Tuning(
        stall_timeout=1.0, backoff_base=0.05, backoff_cap=0.5, status_interval=0.1,
        max_backlog=2000, conflate_after=0.3,
    )  # fmt: skip
    publisher = Publisher(settings, tuning)
    await publisher.start()
    rds = redis.from_url(server.url)
    try:
        control = ControlClient(rds)
        await control.subscribe([EQUITY, INDEX], mode="quote", client="a")
        await eventually(lambda: publisher.sink.published > 0)

        server.stop()
        await eventually(lambda: not publisher.sink.redis_up)
        await eventually(lambda: publisher.sink.conflating)  # the backlog is bounded: ticks conflate
        server.start()
        await rds.aclose()
        rds = redis.from_url(server.url)  # the old pool's sockets died with the server
        control = ControlClient(rds)

        async def hashes_rewritten():
            return await rds.hgetall(keys.token_mode) == {
                str(EQUITY).encode(): b"quote",
                str(INDEX).encode(): b"quote",
            }

        await eventually(hashes_rewritten)
        assert set(await rds.hkeys(keys.token_conn)) == {str(EQUITY).encode(), str(INDEX).encode()}
        assert await rds.hgetall(keys.claims("a")) == {
            str(EQUITY).encode(): b"quote",
            str(INDEX).encode(): b"quote",
        }

        pubsub = rds.pubsub()
        await pubsub.subscribe(keys.ticks(EQUITY))
        async with asyncio.timeout(10):
            while not (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)):
                pass
        assert msgpack.unpackb(message["data"])["instrument_token"] == EQUITY
        await pubsub.aclose()

        async def drops_shown():
            return int(await rds.hget(keys.status, "conflated") or 0) > 0

        await eventually(drops_shown)
        result = await control.subscribe([738561], client="after")  # the control group came back too
        assert result.ok
    finally:
        await publisher.stop()
        await rds.aclose()
        server.stop()


async def test_prometheus_endpoint_shows_the_same_figures(simulator, settings, control) -> None:
    port = free_port()
    publisher = Publisher(settings.model_copy(update={"metrics_port": port}), Tuning(status_interval=0.1))
    await publisher.start()
    try:
        await control.subscribe([EQUITY], client="a")
        await eventually(lambda: publisher.sink.published > 0)
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "kitebus_tokens 1.0" in body and "kitebus_capacity 9000.0" in body
        assert 'kitebus_connection_live{connection="0"} 1.0' in body
        assert "kitebus_published_ticks_total" in body
    finally:
        await publisher.stop()
