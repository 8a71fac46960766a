"""Two `kitebus publish` with the same settings: one leads, the other stands by with no
Kite connection, and takes over when the leader dies or freezes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import msgpack
import redis.asyncio as redis

from kitebus.localredis import LocalRedis, free_port
from tests.integration.conftest import eventually

TOKENS = [(i << 8) | 1 for i in range(1, 31)]


async def _publisher(simulator, redis_url, log_path, **env: str) -> asyncio.subprocess.Process:
    environment = {
        **os.environ, "KITE_WS_URL": simulator.url, "REDIS_URL": redis_url, "KITE_API_KEY": "kitebus",
        "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": "kite", "KITEBUS_LOG_LEVEL": "INFO", **env,
    }  # fmt: skip
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "publisher", env=environment, stdout=log, stderr=log
        )
    finally:
        os.close(log)


async def _leader_pid(rds) -> int | None:
    value = (await rds.get("kite:leader") or b"").decode()
    return int(value.rsplit(":", 1)[1]) if value.count(":") == 2 else None  # not "released"


async def _standby_tried_after(rds, moment: float) -> bool:
    """The standby wrote its presence after ``moment`` (epoch seconds): it writes it right
    after each try of the lease (every 0.5 s), so it tried the lease then."""
    beat = await rds.hget("kite:standby", "heartbeat_at")
    return beat is not None and float(beat) > moment


def _at_kite(simulator) -> dict[int, str]:
    return {t: m for s in simulator.sessions for t, m in s.modes.items()}


async def _two_publishers(simulator, redis_url, rds, control, tmp_path):
    first = await _publisher(simulator, redis_url, tmp_path / "first.log")
    await eventually(lambda: _leader_pid(rds), timeout=15)
    await eventually(lambda: len(simulator.sessions) == 3, timeout=15)
    second = await _publisher(simulator, redis_url, tmp_path / "second.log")
    await eventually(lambda: rds.hget("kite:standby", "pid"), timeout=15)
    assert int(await rds.hget("kite:standby", "pid")) == second.pid
    assert await _leader_pid(rds) == first.pid
    await control.subscribe(TOKENS[:20], mode="full", client="s", timeout=15)
    await control.subscribe(TOKENS[20:], mode="ltp", client="s", timeout=15)
    wanted = {t: "full" for t in TOKENS[:20]} | {t: "ltp" for t in TOKENS[20:]}
    await eventually(lambda: _at_kite(simulator) == wanted, timeout=15)
    return first, second, wanted


async def _stop(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            await proc.wait()


async def test_kill_9_of_the_leader_hands_over_to_the_standby(simulator, redis_url, rds, control, tmp_path):
    first, second, wanted = await _two_publishers(simulator, redis_url, rds, control, tmp_path)
    try:
        standby_started = time.time()
        await eventually(lambda: _standby_tried_after(rds, standby_started + 1.5), timeout=15)  # 4 tries
        attempts_before = [t for t in simulator.handshakes if t >= standby_started]
        assert attempts_before == []  # the standby never knocked at Kite while the leader lived

        pubsub = rds.pubsub()
        await pubsub.psubscribe("kite:ticks:*")
        first_epoch = None
        async with asyncio.timeout(10):
            while first_epoch is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message:
                    first_epoch = msgpack.unpackb(message["data"])["epoch"]
        first.kill()
        killed = time.monotonic()
        await first.wait()
        async with asyncio.timeout(20):  # the first tick published by the new leader
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message and msgpack.unpackb(message["data"])["epoch"] != first_epoch:
                    break
        gap = time.monotonic() - killed
        await pubsub.aclose()
        assert await _leader_pid(rds) == second.pid
        await eventually(lambda: _at_kite(simulator) == wanted, timeout=15)  # no subscription lost
        assert simulator.most_sessions <= 3
        assert gap < 10, gap
        print(f"failover: first tick from the new leader {gap:.2f} s after kill -9 of the old one")
    finally:
        await _stop(first, second)


async def test_a_frozen_leader_lets_go_when_woken_and_the_new_one_serves_every_token(
    simulator, redis_url, rds, control, tmp_path
) -> None:
    first, second, wanted = await _two_publishers(simulator, redis_url, rds, control, tmp_path)
    try:
        frozen_sessions = {s.id for s in simulator.sessions}
        first.send_signal(signal.SIGSTOP)
        await eventually(lambda: _leader_pid(rds), timeout=15)
        await eventually(lambda: _leader_pid_is(rds, second.pid), timeout=15)  # lease ran out: it leads
        assert {s.id for s in simulator.sessions} >= frozen_sessions  # Kite still has the old sockets
        first.send_signal(signal.SIGCONT)
        woken = time.monotonic()
        await eventually(lambda: not frozen_sessions & {s.id for s in simulator.sessions}, timeout=5)
        let_go = time.monotonic() - woken
        await eventually(lambda: _at_kite(simulator) == wanted, timeout=40)  # the new leader, every token
        assert simulator.most_sessions <= 3 and await _leader_pid(rds) == second.pid
        assert first.returncode is None  # the old leader stands by now
        assert let_go < 1.5, let_go
    finally:
        await _stop(first, second)


async def _leader_pid_is(rds, pid: int) -> bool:
    return await _leader_pid(rds) == pid


async def test_a_standby_with_other_settings_refuses_to_take_over(simulator, redis_url, rds, tmp_path):
    first = await _publisher(simulator, redis_url, tmp_path / "first.log")
    other = None
    try:
        await eventually(lambda: _leader_pid(rds), timeout=15)
        await eventually(lambda: _state_is(rds, b"running"), timeout=15)
        other_log = tmp_path / "other.log"
        other = await _publisher(simulator, redis_url, other_log, KITEBUS_TOKENS_PER_CONNECTION="100")
        await eventually(lambda: rds.hget("kite:standby", "refusing"), timeout=15)
        refusing = (await rds.hget("kite:standby", "refusing")).decode()
        assert "the leader runs 3 connections for 9000 tokens, this publisher 3 for 300" in refusing
        first.kill()
        await first.wait()
        expired = time.time() + 3.0  # the lease's ttl at most
        # tried twice on a lease gone: still no takeover with the wrong capacity
        await eventually(lambda: _standby_tried_after(rds, expired + 1.0), timeout=15)
        assert await rds.get("kite:leader") is None
        assert "will not take over" in other_log.read_text()
        env = {**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"}
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kitebus", "status", env=env, stdout=asyncio.subprocess.PIPE
        )
        out = (await status.communicate())[0].decode()
        assert f"standby {os.uname().nodename}:{other.pid}" in out and "STANDBY WILL NOT TAKE OVER" in out
    finally:
        await _stop(first, *([other] if other else []))


async def _state_is(rds, state: bytes) -> bool:
    return await rds.hget("kite:status", "state") == state


async def test_redis_losing_its_data_hands_nothing_over(simulator, tmp_path) -> None:
    """Found by the soak: the lease vanished with Redis's data and the standby took it while
    the leader still trusted its own; now the leader takes it back and the standby waits."""
    (tmp_path / "redis").mkdir()
    server = LocalRedis(tmp_path / "redis", free_port())
    server.start()
    rds = redis.from_url(server.url)
    first = second = None
    try:
        first = await _publisher(simulator, server.url, tmp_path / "first.log")
        await eventually(lambda: _leader_pid_is(rds, first.pid), timeout=15)
        await eventually(lambda: len(simulator.sessions) == 3, timeout=15)
        second = await _publisher(simulator, server.url, tmp_path / "second.log")
        await eventually(lambda: rds.hget("kite:standby", "pid"), timeout=15)
        sessions = {s.id for s in simulator.sessions}
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        server.process = None
        server.start()  # empty
        restarted = time.time()
        await rds.aclose()
        rds = redis.from_url(server.url)
        await eventually(lambda: _leader_pid_is(rds, first.pid), timeout=10)
        waited = time.time() + 3.0  # the standby's wait: a ttl after Redis answered it again
        # past it, tried twice more: it must not have taken over
        await eventually(lambda: _standby_tried_after(rds, waited + 1.0), timeout=15)
        assert await _leader_pid(rds) == first.pid
        assert {s.id for s in simulator.sessions} == sessions  # the same sockets throughout
        assert [t for t in simulator.handshakes if t >= restarted] == []
    finally:
        await _stop(*[p for p in (first, second) if p is not None])
        await rds.aclose()
        server.stop()


async def test_a_takeover_keeps_a_live_clients_claims_and_still_expires_a_dead_ones(
    simulator, redis_url, rds, control, tmp_path
) -> None:
    """Session clients across kill -9 of the leader: the new leader gives each a whole
    timeout from the takeover, so a live one (beating) keeps its claims and a dead one
    (one request, no heartbeat since) is released, by the new leader."""
    from consumers.subscriber import TickSubscriber

    live, gone = TOKENS[0], TOKENS[1]
    first, second, _ = await _two_publishers(simulator, redis_url, rds, control, tmp_path)
    try:
        async with TickSubscriber(redis_url, client="live", client_timeout=2.0, release_on_exit=False) as sub:
            await sub.subscribe([live], mode="quote", wait_live=False)
            await rds.xadd("kite:control", {"op": "subscribe", "tokens": str(gone), "client": "gone",
                                            "session": "3"})  # fmt: skip
            await eventually(lambda: rds.exists("kite:claims:gone"), timeout=10)
            first.kill()
            await first.wait()
            async def second_leads() -> bool:
                return await _leader_pid(rds) == second.pid

            await eventually(second_leads, timeout=20)
            took_over = time.time()

            async def expired() -> list[dict[bytes, bytes]]:
                results = [f for _, f in await rds.xrange("kite:control:results") if f[b"op"] == b"expire"]
                return [f for f in results if f[b"client"] == b"gone"]

            (result,) = await eventually(expired, timeout=20)
            assert result[b"applied"] == str(gone).encode() and result[b"ok"] == b"1"

            async def beat_after(moment: float) -> bool:
                return float(await rds.hget("kite:client_heartbeat", "live") or 0) > moment

            await eventually(lambda: beat_after(took_over + 4.0), timeout=15)  # alive two timeouts on
            assert await rds.hgetall("kite:claims:live") == {str(live).encode(): b"quote"}
            assert not await rds.exists("kite:claims:gone")
    finally:
        await _stop(first, second)
