"""The ops commands through their entry point, against a running publisher."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from tests.integration.conftest import eventually

INFY = 408065


async def kitebus(redis_url: str, *args: str, timeout: float = 30, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", *args,
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_ctl_subscribe_prints_the_result_and_exits_0(publisher, redis_url) -> None:
    code, out, _ = await kitebus(redis_url, "ctl", "subscribe", "408065,884737", "--mode", "full")
    assert code == 0 and out.startswith("ok: subscribe client=ops applied=2")
    assert publisher.book.in_force == {INFY: "full", 884737: "full"}
    code, out, _ = await kitebus(redis_url, "ctl", "mode", "408065", "--mode", "ltp", "--json")
    assert code == 0 and json.loads(out)["applied"] == [INFY]
    assert publisher.book.in_force[INFY] == "ltp"


async def test_ctl_rejection_exits_1_and_bad_input_exits_2(publisher, redis_url) -> None:
    code, out, _ = await kitebus(redis_url, "ctl", "mode", "123", "--mode", "full", "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["rejected"] == [123]
    code, out, _ = await kitebus(redis_url, "ctl", "subscribe", "NSE:NOPE")
    assert code == 1 and "unknown instrument NSE:NOPE" in out
    code, _, err = await kitebus(redis_url, "ctl", "mode", "1")
    assert code == 2 and "--mode is required" in err


async def test_ctl_and_tail_take_symbols_with_no_file_on_their_side(publisher, redis_url) -> None:
    code, out, _ = await kitebus(redis_url, "ctl", "subscribe", "NSE:INFY", "NSE:NIFTY 50", "--json")
    assert code == 0 and json.loads(out)["applied"] == [INFY, 256265]
    code, out, _ = await kitebus(redis_url, "tail", "NSE:INFY", "--count", "1")
    assert code == 0 and "NSE:INFY" in out
    code, _, err = await kitebus(redis_url, "tail", "NSE:NOPE", "--count", "1")
    assert code == 2 and "unknown instrument NSE:NOPE" in err


async def test_ctl_times_out_without_a_publisher(redis_url) -> None:
    code, _, err = await kitebus(redis_url, "ctl", "subscribe", "1", "--timeout", "0.5")
    assert code == 3 and "is the publisher running" in err


async def test_status_json_and_table(publisher, control, redis_url, rds, keys) -> None:
    await control.subscribe([INFY, 256265], mode="quote", client="s1")

    async def status_written() -> bool:
        ticks = [int(await rds.hget(keys.conn(i), "ticks") or 0) for i in range(3)]
        return await rds.hget(keys.status, "tokens") == b"2" and sum(ticks) > 0

    await eventually(status_written)
    code, out, _ = await kitebus(redis_url, "status", "--json", "--sample", "0.5")
    data = json.loads(out)
    assert code == 0 and data["publisher"]["alive"] is True
    assert data["totals"] == {"tokens": 2, "capacity": 9000, "remaining": 8998}
    assert [c["state"] for c in data["connections"]] == ["live"] * 3
    assert data["clients"] == {"s1": 2}
    code, out, _ = await kitebus(redis_url, "status", "--sample", "0")
    assert code == 0 and "tokens 2 of 9,000" in out and "s1 (2)" in out and "live" in out
    assert "publisher [kite]: running" in out


async def test_status_exits_1_when_the_heartbeat_is_stale(redis_url, rds, keys) -> None:
    await rds.hset(keys.status, mapping={"state": "running", "heartbeat_at": "1000.0", "connections": "0"})
    code, out, _ = await kitebus(redis_url, "status", "--json", "--sample", "0")
    assert code == 1 and json.loads(out)["publisher"]["alive"] is False


async def test_status_says_old_heartbeat_rather_than_running(redis_url, rds, keys) -> None:
    """A publisher whose last word was ``running`` but which has not written for three of
    its heartbeat intervals is shown as such, not as running."""
    old = f"{time.time() - 12:.3f}"
    await rds.hset(keys.status, mapping={
        "state": "running", "heartbeat_at": old, "heartbeat_interval": "1", "connections": "0",
    })  # fmt: skip
    code, out, _ = await kitebus(redis_url, "status", "--sample", "0")
    assert code == 1 and "OLD HEARTBEAT (12." in out and "alive" not in out.replace("NOT ALIVE", "")
    code, out, _ = await kitebus(redis_url, "status", "--json", "--sample", "0")
    assert code == 1 and json.loads(out)["publisher"]["old_heartbeat"] is True

    # 12 s is less than 3 intervals of 10 s: not old yet
    await rds.hset(keys.status, mapping={"heartbeat_interval": "10"})
    code, out, _ = await kitebus(redis_url, "status", "--sample", "0")
    assert code == 0 and "OLD HEARTBEAT" not in out and "alive" in out


async def test_status_shows_why_the_publisher_is_degraded(redis_url, rds, keys) -> None:
    await rds.hset(keys.status, mapping={
        "state": "degraded", "heartbeat_at": f"{time.time():.3f}", "connections": "0", "task_restarts": "2",
        "degraded_reason": "task live-watch: crashed (RuntimeError: injected), restarting",
    })  # fmt: skip
    code, out, _ = await kitebus(redis_url, "status", "--sample", "0")
    assert code == 0 and "DEGRADED: task live-watch: crashed (RuntimeError: injected)" in out
    assert "tasks restarted after a crash: 2" in out


async def test_tail_prints_snapshot_then_live_ticks(publisher, control, redis_url, rds, keys) -> None:
    await control.subscribe([INFY], mode="full", client="t")
    await eventually(lambda: rds.hexists(keys.last, str(INFY)))
    code, out, _ = await kitebus(redis_url, "tail", "408065", "--json", "--count", "3")
    ticks = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [t["instrument_token"] for t in ticks] == [INFY] * 3
    assert ticks[0]["received_at_ns"] < ticks[1]["received_at_ns"] < ticks[2]["received_at_ns"]
    code, out, _ = await kitebus(redis_url, "tail", "408065", "--count", "1")
    assert code == 0 and " NSE:INFY(408065) full " in out and "bid " in out


async def test_tail_prints_stream_status_when_the_connection_drops(publisher, control, redis_url, simulator):
    await control.subscribe([INFY], mode="ltp", client="t")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "tail", "408065", "--count", "100000",
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while " NSE:INFY(408065) " not in "".join(lines):  # ticks are flowing, named
                lines.append((await proc.stdout.readline()).decode())
            simulator.drop()
            while not any(line.startswith("# STALE: NSE:INFY") for line in lines):
                lines.append((await proc.stdout.readline()).decode())
            while not any(line.startswith("# LIVE: NSE:INFY") for line in lines):
                lines.append((await proc.stdout.readline()).decode())
    finally:
        proc.terminate()
        await proc.wait()


async def test_status_into_a_closed_pipe_ends_quietly_and_its_first_line_is_whole(publisher, redis_url):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -c 0`: the reader is gone before kitebus writes
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "status", "--json", "--sample", "0.1",
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"},
        stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"Traceback" not in err

    code, out, _ = await kitebus(redis_url, "status", "--sample", "0.1")
    first = out.splitlines()[0]
    assert code == 0 and first.startswith("publisher [kite]: running")
    assert first.rstrip().endswith("malformed 0, unclaimed 0")  # not wrapped at 80 columns


async def test_ctl_rebalance_waits_for_the_moves_and_takes_no_tokens(publisher, control, redis_url) -> None:
    await control.subscribe([1, 2, 3, 4, 5, 6], client="s")  # two per connection
    await control.unsubscribe([2, 5, 3], client="s")  # left: 1 and 4 on 0, 6 on 2
    code, out, _ = await kitebus(redis_url, "ctl", "rebalance")
    assert code == 0 and out.strip() == "ok: rebalance moved 1 token(s); tokens per connection now 1,1,1"
    assert publisher.book.loads == [1, 1, 1] and publisher.book.moving == {}
    code, _, err = await kitebus(redis_url, "ctl", "rebalance", "408065")
    assert code == 2 and "no tokens" in err


async def test_ctl_lists_clients_and_releases_a_vanished_one(publisher, control, redis_url, rds, keys):
    await control.subscribe([1, 2, 3], client="gone", ttl=600)
    await control.subscribe([3], client="alive")
    code, out, _ = await kitebus(redis_url, "ctl", "clients", "--json")
    listed = json.loads(out)
    assert code == 0 and set(listed) == {"gone", "alive"} and listed["gone"]["claims"] == 3
    assert listed["gone"]["last_request_at"] > 0
    code, _, err = await kitebus(redis_url, "ctl", "release")
    assert code == 2 and "--client" in err
    code, out, _ = await kitebus(redis_url, "ctl", "release", "--client", "gone")
    assert code == 0 and out.strip() == "ok: release client=gone released=3"
    assert publisher.book.claims == {"alive": {3: "quote"}} and set(publisher.book.placement) == {3}
    assert not await rds.exists(keys.claims("gone"), keys.deadlines("gone"))
    assert await rds.smembers(keys.clients) == {b"alive"}
    assert await rds.hkeys(keys.client_activity) == [b"alive"]


async def test_tail_orders_prints_order_updates_as_they_come(publisher, simulator, redis_url) -> None:
    placed = await simulator.order("place", tradingsymbol="SBIN", quantity=10, price=960.0)
    await simulator.order("fill", order_id=placed["order_id"], quantity=4)
    await eventually(lambda: publisher.orders.published == 2)
    code, out, _ = await kitebus(redis_url, "tail", "--orders", "--since", "0", "--json", "--count", "2")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [u["status"] for u in lines] == ["OPEN", "UPDATE"]
    assert {u["account"] for u in lines} == {"default"} and lines[0]["id"] < lines[1]["id"]
    assert lines[0]["data"] == placed and lines[1]["data"]["filled_quantity"] == 4
    # from now on, as they come, one line each
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "tail", "--orders", "--count", "2",
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await eventually(lambda: _client_waits(redis_url, "xread"))
    await simulator.order("fill", order_id=placed["order_id"])
    await simulator.order("place", tradingsymbol="INFY", quantity=1, reject="RMS: margin exceeds")
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    first, second = out.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    assert f"ORDER [default] {placed['order_id']} COMPLETE BUY SBIN 10/10 @ 960.00" in first
    assert "REJECTED BUY INFY 0/1" in second and "'RMS: margin exceeds'" in second
    code, _, err = await kitebus(redis_url, "tail")
    assert code == 2 and "--orders" in err


async def _client_waits(redis_url: str, command: str) -> bool:
    import redis.asyncio as redis

    client = redis.from_url(redis_url)
    try:
        return any(c["cmd"] == command for c in await client.client_list())
    finally:
        await client.aclose()
