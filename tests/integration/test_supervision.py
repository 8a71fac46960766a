"""Every long-lived task of the publisher, ended in turn by an injected exception: it is
restarted on the same objects (``degraded`` naming it meanwhile) and the publisher goes on
serving; one that keeps crashing makes ``kitebus publish`` exit 1 with the reason."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, generate_latest

from config import Keys, Settings, load_settings
from consumers.control import ControlClient
from publisher.app import Publisher
from publisher.lease import Lease
from publisher.monitor import _Metrics
from rediswire import bus
from simulator.server import TickerServer
from tests.integration.conftest import FAST, INSTRUMENTS_CSV, eventually

INFY, TCS, NIFTY = 408065, 2953217, 256265
TUNING = replace(FAST, settle=1.0)  # degraded for a second after a restart: long enough to see


@dataclass
class Case:
    task: str  # the supervised task's name, as the status names it
    target: Callable[[Publisher], Any]  # the object whose method fails once
    method: str
    trigger: Callable[[Publisher, TickerServer, ControlClient, Path], Any] | None = None


async def _subscribe_new(pub: Publisher, sim: TickerServer, control: ControlClient, path: Path) -> None:
    await control.subscribe([NIFTY], mode="ltp", client="during")  # its `live` follow-up crashes the watch


async def _place_an_order(pub: Publisher, sim: TickerServer, control: ControlClient, path: Path) -> None:
    await sim.order("place", tradingsymbol="SBIN", quantity=1)  # its write crashes the order feed


def _rewrite_access_token_file(pub: Publisher, sim: TickerServer, control: ControlClient, path: Path) -> None:
    path.write_text("simulator\n")


async def _rebalance(pub: Publisher, sim: TickerServer, control: ControlClient, path: Path) -> None:
    result = await control.request("rebalance", None, client="ops")  # its follow-up's write crashes
    assert result.ok


CASES = [
    Case("control-loop", lambda p: p.control, "_expire_due"),
    Case("tick-sink", lambda p: p.sink, "_take_batch"),
    Case("monitor", lambda p: p.monitor, "_take_problems"),
    Case("lease", lambda p: p.lease, "renew"),
    Case("live-watch", lambda p: p.live, "_progress", _subscribe_new),
    Case("instruments", lambda p: p.instruments, "load", lambda p, *_: p.instruments.reload()),
    Case("access-token-watch", lambda p: p.access_tokens[0], "reload", _rewrite_access_token_file),
    Case("handover", lambda p: p.handover, "_look"),
    Case("kite-connection-0", lambda p: p.connections[0], "_pause", lambda p, sim, *_: sim.drop()),
    Case("orders", lambda p: p.orders, "_write", _place_an_order),
    Case("rebalance", lambda p: p.rebalancer, "_report", _rebalance),
]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "access_token"
    path.write_text("simulator\n")
    return path


@pytest.fixture
def led_settings(redis_url: str, simulator: TickerServer, token_file: Path) -> Settings:
    return load_settings(
        kite_ws_url=simulator.url, redis_url=redis_url, kite_api_key="kitebus",
        kite_access_token_file=str(token_file), namespace="kite", instruments=str(INSTRUMENTS_CSV),
    )  # fmt: skip


@pytest.fixture
async def leader(led_settings: Settings, keys: Keys) -> AsyncIterator[Publisher]:
    """A publisher as ``kitebus publish`` runs one: holding the lease, so every task runs."""
    client = bus.connect(led_settings.redis_url, False, socket_connect_timeout=5, socket_timeout=5)
    lease = Lease(client, keys)
    assert await lease.acquire()
    running = Publisher(led_settings, TUNING, lease=lease)
    lease.start(running.health)
    try:
        await running.start()
        await eventually(lambda: all(c.state == "live" for c in running.connections))
        yield running
    finally:
        await running.stop()
        await lease.close(release=True)
        await client.aclose()


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, method: str) -> list[bool]:
    """The next call of ``owner.method`` raises; every later one is the real method's."""
    original = getattr(owner, method)
    fired: list[bool] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            raise RuntimeError(f"injected into {method}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, once)
    return fired


async def _status(rds: redis.Redis, keys: Keys) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await rds.hgetall(keys.status)).items()}


async def _ticks_arrive(rds: redis.Redis, keys: Keys, token: int) -> None:
    pubsub = rds.pubsub()
    await pubsub.subscribe(keys.ticks(token))
    try:
        await eventually(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1))
    finally:
        await pubsub.aclose()


@pytest.mark.parametrize("case", CASES, ids=[case.task for case in CASES])
async def test_a_crashed_task_is_restarted_and_the_publisher_serves_on(
    case: Case, leader: Publisher, simulator, rds, keys, control, monkeypatch
) -> None:
    await control.subscribe([INFY], mode="full", client="before")
    await _ticks_arrive(rds, keys, INFY)
    assert (await _status(rds, keys))["task_restarts"] == "0"
    claims = {c: dict(held) for c, held in leader.book.claims.items()}

    fired = _fail_once(monkeypatch, case.target(leader), case.method)
    if case.trigger is not None:
        triggered = case.trigger(leader, simulator, control, Path(str(leader.access_tokens[0].path)))
        if asyncio.iscoroutine(triggered):
            await triggered
    await eventually(lambda: fired)

    async def degraded_naming_it() -> dict[str, str] | None:
        status = await _status(rds, keys)
        named = status["state"] == "degraded" and f"task {case.task}: crashed" in status["degraded_reason"]
        return status if named else None

    status = await eventually(degraded_naming_it)
    assert status["task_restarts"] == "1" and f"injected into {case.method}" in status["degraded_reason"]
    registry = CollectorRegistry()
    registry.register(_Metrics(leader.monitor))
    metrics = generate_latest(registry).decode()
    assert f'kitebus_task_restarts_total{{task="{case.task}"}} 1.0' in metrics
    assert "kitebus_degraded 1.0" in metrics

    async def running_again() -> bool:
        status = await _status(rds, keys)
        return status["state"] == "running" and status["degraded_reason"] == ""

    await eventually(running_again)
    assert leader.health.restarts == {case.task: 1} and not leader.health.fatal.is_set()
    for client, held in claims.items():  # nothing the book held was lost
        assert leader.book.claims[client] == held

    # it still serves: a request is answered, its ticks arrive, earlier ones still tick
    result = await control.subscribe([TCS], mode="quote", client="after")
    assert result.ok and result.applied == (TCS,)
    await _ticks_arrive(rds, keys, TCS)
    await _ticks_arrive(rds, keys, INFY)
    if case.task == "orders":  # the update whose write the crash hit is written after the restart
        await eventually(lambda: rds.xlen(keys.orders))
    if case.trigger is _subscribe_new:  # the follow-up of the request the crash hit still comes
        async def followed_up() -> bool:
            results = [fields for _, fields in await rds.xrange(keys.control_results)]
            return any(f[b"op"] == b"live" and f[b"applied"] == str(NIFTY).encode() for f in results)

        await eventually(followed_up)
    if case.task == "rebalance":  # the follow-up the crash hit is written by the restarted task
        async def rebalanced() -> bool:
            return any(f[b"op"] == b"rebalanced" for _, f in await rds.xrange(keys.control_results))

        await eventually(rebalanced)


# A publisher process whose live watch always crashes: patched in, then the real CLI.
_ALWAYS_CRASHING = """
import sys
from publisher.live import LiveWatch

async def crash(self):
    raise RuntimeError("injected: the live watch always fails")

LiveWatch._run = crash
from kitebus.cli import main
sys.exit(main(["publish"]))
"""


async def test_a_task_that_keeps_crashing_makes_kitebus_publish_exit_1_with_the_reason(
    simulator, redis_url, rds, keys
) -> None:
    env = {
        **os.environ, "KITE_WS_URL": simulator.url, "REDIS_URL": redis_url, "KITE_API_KEY": "kitebus",
        "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": "kite",
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ALWAYS_CRASHING, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = err.decode()
    assert proc.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("kitebus publish: failed: task live-watch crashed 6 times")
    assert "RuntimeError: injected: the live watch always fails" in last
    status = await _status(rds, keys)
    assert status["state"] == "failed" and "task live-watch" in status["failed_reason"]
    assert status["task_restarts"] == "5"
    assert (await rds.get(keys.leader)) == b"released"  # a standby takes over at once
