"""Claims that die with their strategy: session clients' heartbeats, watched at the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from consumers.control import ControlClient
from consumers.subscriber import TickSubscriber
from publisher.app import Publisher
from simulator.server import subscribed
from tests.integration.conftest import FAST, eventually
from tests.integration.test_cli import kitebus

CLIENT = Path(__file__).with_name("session_client.py")
A, B, C = 408065, 2953217, 341249  # INFY, TCS, HDFCBANK


def _at_kite(simulator) -> dict[int, str]:
    return {t: m for modes in subscribed(simulator).values() for t, m in modes.items()}


def _unsubscribed_at_kite(simulator) -> set[int]:
    return {t for s in simulator.sessions for t in s.unsubscribed}


async def _results(rds, keys, op: str) -> list[dict[str, str]]:
    """Result entries of ``op``, each with ``at``: epoch seconds of its id."""
    entries = await rds.xrange(keys.control_results)
    return [
        {k.decode(): v.decode() for k, v in f.items()} | {"at": int(i.split(b"-")[0]) / 1000}
        for i, f in entries
        if f[b"op"] == op.encode()
    ]


async def _heartbeat(rds, keys, client: str) -> float:
    return float(await rds.hget(keys.client_heartbeat, client) or 0)


async def _strategy(redis_url: str, kind: str, client: str, tokens: list[int], timeout: float):
    """A strategy process claiming ``tokens`` through the library, once it says it is ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENT), kind, client, ",".join(map(str, tokens)),
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite",
             "KITEBUS_CLIENT_TIMEOUT": f"{timeout:g}"},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    line = await asyncio.wait_for(proc.stdout.readline(), 40)
    if line != b"ready\n":
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"the strategy did not start: {line!r} {err.decode()[-2000:]}")
    return proc


@pytest.mark.parametrize("kind", ["subscriber", "blocking", "kiteticker"])
async def test_a_killed_strategy_loses_its_claims_and_a_token_another_holds_stays(
    kind, simulator, publisher, redis_url, rds, keys
) -> None:
    await ControlClient(rds, "kite", session=False).subscribe([B], mode="ltp", client="ops")
    proc = await _strategy(redis_url, kind, "strategy", [A, B], timeout=1.0)
    try:
        assert publisher.book.claims["strategy"] == {A: "quote", B: "quote"}
        assert publisher.book.sessions == {"strategy": 1.0}
        await eventually(lambda: _at_kite(simulator) == {A: "quote", B: "quote"})
        since = time.time()
        await eventually(lambda: _beat_after(rds, keys, "strategy", since + 2.0), timeout=10)
        assert "strategy" in publisher.book.claims  # alive for twice its timeout: kept
    finally:
        proc.kill()
        await proc.wait()

    await eventually(lambda: "strategy" not in publisher.book.claims, timeout=10)
    (expired,) = await _results(rds, keys, "expire")
    assert expired["client"] == "strategy" and expired["applied"] == f"{A},{B}" and expired["ok"] == "1"
    assert expired["request"] == "" and expired["reason"].startswith("heartbeat silent for ")
    assert expired["reason"].endswith("(client timeout 1s)")
    await eventually(lambda: _at_kite(simulator) == {B: "ltp"})  # the other holder's mode in force
    assert _unsubscribed_at_kite(simulator) == {A}  # B was never unsubscribed at Kite
    assert publisher.book.claims == {"ops": {B: "ltp"}} and publisher.book.sessions == {}
    assert not await rds.exists(keys.claims("strategy"), keys.deadlines("strategy"))
    assert await rds.smembers(keys.clients) == {b"ops"}
    assert await rds.hgetall(keys.session_clients) == {}
    assert await rds.hget(keys.client_heartbeat, "strategy") is None


async def _beat_after(rds, keys, client: str, at: float) -> bool:
    """The client wrote a heartbeat after ``at`` (epoch seconds): it was alive then."""
    return await _heartbeat(rds, keys, client) > at


async def test_a_live_client_keeps_its_claims_across_a_restart_and_a_dead_one_still_goes(
    simulator, settings, redis_url, rds, keys
) -> None:
    first = Publisher(settings, FAST)
    await first.start()
    async with TickSubscriber(redis_url, client="live", client_timeout=1.0, release_on_exit=False) as sub:
        await sub.subscribe([A], wait_live=False)
        # a strategy that died just now: its one sign of life was its request
        await rds.xadd(keys.control, {"op": "subscribe", "tokens": str(B), "client": "gone", "session": "3"})
        await eventually(lambda: "gone" in first.book.claims)
        await first.stop()
        stopped = time.time()
        await eventually(lambda: _beat_after(rds, keys, "live", stopped + 1.5))  # down past its timeout

        started = time.time()
        second = Publisher(settings, FAST)
        await second.start()
        try:
            assert second.book.sessions == {"live": 1.0, "gone": 3.0}  # the kinds survive the restart
            await eventually(lambda: "gone" not in second.book.claims, timeout=10)
            (expired,) = await _results(rds, keys, "expire")
            assert expired["client"] == "gone" and expired["at"] - started >= 3.0  # a whole timeout after
            assert second.book.claims == {"live": {A: "quote"}}  # alive 3 s under the new one: kept
            await eventually(lambda: _at_kite(simulator) == {A: "quote"})
        except BaseException:
            await second.stop()
            raise
    try:  # the live one stops beating (its heartbeat deleted, claims left): it goes in turn
        await eventually(lambda: "live" not in second.book.claims, timeout=10)
        reasons = {e["client"]: e["reason"] for e in await _results(rds, keys, "expire")}
        assert reasons["live"] == "no heartbeat for 1s (client timeout 1s)"
    finally:
        await second.stop()


async def test_kiteticker_close_then_an_immediate_exit_leaks_nothing(
    simulator, publisher, redis_url, rds, keys
) -> None:
    # A long timeout: an expiry cannot be what releases the claims.
    proc = await _strategy(redis_url, "kiteticker", "dropin", [A, C], timeout=600)
    assert publisher.book.claims["dropin"] == {A: "quote", C: "quote"}
    assert await rds.hget(keys.session_clients, "dropin") == b"600"
    assert await _heartbeat(rds, keys, "dropin") > 0
    proc.stdin.write(b"close\n")
    await proc.stdin.drain()
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    # No waiting here: close() returned once the publisher had applied the release.
    assert "dropin" not in publisher.book.claims and publisher.book.sessions == {}
    assert not await rds.exists(keys.claims("dropin"))
    assert await rds.hget(keys.session_clients, "dropin") is None
    assert await rds.hget(keys.client_heartbeat, "dropin") is None
    (released,) = await _results(rds, keys, "release")
    assert released["client"] == "dropin" and released["applied"] == f"{A},{C}"
    await eventually(lambda: _at_kite(simulator) == {})


async def test_ctl_and_raw_claims_never_expire_and_ctl_clients_shows_each_kind(
    simulator, publisher, control, redis_url, rds, keys
) -> None:
    await rds.xadd(keys.control, {"op": "subscribe", "tokens": str(A), "client": "raw"})
    code, _, err = await kitebus(
        redis_url, "ctl", "subscribe", str(B), "--client", "ops", KITEBUS_CLIENT_TIMEOUT="0.5"
    )
    assert code == 0, err
    await control.subscribe([C], client="lib")  # this test's own heartbeat keeps it
    await rds.xadd(keys.control, {"op": "subscribe", "tokens": str(C), "client": "gone", "session": "0.5"})
    await eventually(lambda: "gone" in publisher.book.claims)
    await eventually(lambda: "gone" not in publisher.book.claims)  # silent for its 0.5 s: expired
    assert publisher.book.claims == {"raw": {A: "quote"}, "ops": {B: "quote"}, "lib": {C: "quote"}}

    code, out, _ = await kitebus(redis_url, "ctl", "clients", "--json")
    listed = json.loads(out)
    assert code == 0 and set(listed) == {"raw", "ops", "lib"}
    assert listed["raw"]["kind"] == listed["ops"]["kind"] == "standing"
    assert listed["raw"]["heartbeat_age"] is None and listed["ops"]["timeout"] is None
    assert listed["lib"]["kind"] == "session" and listed["lib"]["timeout"] == 60
    assert 0 <= listed["lib"]["heartbeat_age"] < 60
    code, out, _ = await kitebus(redis_url, "ctl", "clients")
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["ops"][2] == "standing (until released)"
    assert rows["lib"][2].startswith("session, heartbeat ") and rows["lib"][2].endswith("s ago (timeout 60s)")


class _CutOff:
    """This process's heartbeat connection, cut off from Redis (the publisher still reaches it)."""

    async def hset(self, *args, **kwargs):
        raise RedisConnectionError("cut off")


async def test_a_subscriber_cut_off_past_its_timeout_claims_again_once_it_is_back(
    simulator, publisher, redis_url, rds, keys
) -> None:
    """Only the strategy lost Redis, for longer than its timeout: the publisher rightly
    expired its claims. When its heartbeat goes again, the library makes them again, in
    their modes, rather than leave the strategy subscribed to nothing."""
    async with TickSubscriber(redis_url, client="cut", client_timeout=1.0) as sub:
        await sub.subscribe([A], mode="full")
        await sub.subscribe([B], mode="ltp")
        beat = sub.control.heartbeat
        connected, beat._redis = beat._redis, _CutOff()
        await eventually(lambda: "cut" not in publisher.book.claims, timeout=15)
        await eventually(lambda: not _at_kite(simulator))
        beat._redis = connected
        await eventually(lambda: _at_kite(simulator) == {A: "full", B: "ltp"}, timeout=15)
        assert publisher.book.claims["cut"] == {A: "full", B: "ltp"}
        assert await rds.hgetall(keys.claims("cut")) == {str(A).encode(): b"full", str(B).encode(): b"ltp"}


async def test_a_strategy_stopped_past_its_timeout_claims_again_once_it_runs_on(
    simulator, publisher, redis_url, rds, keys
) -> None:
    """Found by review: a strategy stopped (SIGSTOP, a paused container, a stalled VM) gets
    no error, only a gap between two beats; the publisher rightly expired it meanwhile. Once
    it runs on it must claim again, not beat on while subscribed to nothing."""
    proc = await _strategy(redis_url, "subscriber", "stopped", [A], timeout=1.0)
    try:
        await eventually(lambda: publisher.book.claims.get("stopped") == {A: "quote"})
        os.kill(proc.pid, signal.SIGSTOP)
        await eventually(lambda: "stopped" not in publisher.book.claims, timeout=15)
        await eventually(lambda: not _at_kite(simulator))
        os.kill(proc.pid, signal.SIGCONT)
        await eventually(lambda: publisher.book.claims.get("stopped") == {A: "quote"}, timeout=15)
        await eventually(lambda: _at_kite(simulator) == {A: "quote"})
    finally:
        proc.kill()
        await proc.wait()
