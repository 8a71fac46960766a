"""kitebus replay against a real Redis: a recording (written as ``kitebus record`` writes one)
played back through the simulator and a publisher into a namespace of its own, received by
a strategy's ``TickSubscriber`` and compared with the recording."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import redis.asyncio as redis

from config import Settings, load_settings
from consumers.recorder import IST, ParquetSink, read_recording
from consumers.subscriber import StreamStatus, TickSubscriber
from kitebus.replay import Replay, ReplayReport, load
from kitewire import codec
from simulator.market import INSTRUMENTS, Market

RECORDED_MODES = {INSTRUMENTS[0].token: "full", INSTRUMENTS[1].token: "quote", INSTRUMENTS[2].token: "ltp",
                  INSTRUMENTS[3].token: "full", INSTRUMENTS[4].token: "full"}  # fmt: skip
CLAIMED = [INSTRUMENTS[i].token for i in range(4)]  # the fifth is recorded, never claimed
VOLATILE = ("seq", "epoch", "received_at_ns")  # what a replay stamps afresh


def write_recording(root: Path, steps: int, every_ns: int, stale: tuple[int, int] | None = None) -> None:
    """``steps`` rounds of one tick per token ``every_ns`` apart, each payload made by the
    publisher's own encoder, written by the recorder's sink; ``stale``: the first token is
    stale from round a to round b."""
    market = Market(seed=3)
    sink = ParquetSink(root)
    start = time.time_ns() - steps * every_ns
    seqs = dict.fromkeys(RECORDED_MODES, 0)
    for step in range(steps):
        at = start + step * every_ns
        for token, mode in RECORDED_MODES.items():
            if stale and token == CLAIMED[0] and stale[0] <= step < stale[1]:
                continue  # no ticks while stale
            packet = codec.encode_packet(market.tick(token, mode, at // 10**9))
            frame = codec.encode_frame([packet])
            seqs[token] += 1
            _, payload = codec.PAYLOAD_WRITERS[len(packet)].write(frame, 4, at - 1000, seqs[token], 42)
            sink.ticks.append({**msgpack.unpackb(payload), "recorded_at_ns": at})
        if stale and step in stale:
            kind = "stale" if step == stale[0] else "live"
            sink.events.append({"kind": kind, "token": CLAIMED[0], "from_seq": None, "to_seq": None,
                                "at": at, "reason": "connection 0"})  # fmt: skip
    sink.flush()


def in_mode(tick: dict, mode: str) -> dict:
    """A recorded tick as a packet of ``mode`` carries it (the replay's projection)."""
    frame = codec.encode_frame([codec.encode_packet({**tick, "mode": mode})])
    _, payload = codec.PAYLOAD_WRITERS[len(frame) - 4].write(frame, 4, 0, 0, 0)
    return _stable(msgpack.unpackb(payload))


def _stable(tick: dict) -> dict:
    return {k: v for k, v in tick.items() if k not in (*VOLATILE, "recorded_at_ns")}


def _canonical(tick: dict) -> str:
    return json.dumps(_stable(tick), sort_keys=True)


def replay_settings(redis_url: str, namespace: str) -> Settings:
    """Kite's settings are the real account's: a replay puts the simulator's in their place."""
    return load_settings(redis_url=redis_url, namespace=namespace, kite_api_key="real", kite_access_token="-")


Received = dict[int, list[dict]]  # token -> its ticks, in the order they came


async def play(redis_url: str, namespace: str, root: Path, mode: str, speed: float | None,
               statuses: list[StreamStatus] | None = None) -> tuple[Received, ReplayReport]:  # fmt: skip
    """Replay ``root`` while a strategy claims ``CLAIMED`` in ``mode``; what it received."""
    ticks, holes = load(root, None, None)
    settings = replay_settings(redis_url, namespace)
    replay = Replay(settings, ticks, holes, speed=speed)
    stop = asyncio.Event()
    task = asyncio.create_task(replay.run(stop))
    await asyncio.wait_for(replay.ready.wait(), 30)
    got: Received = {t: [] for t in CLAIMED}
    on_status = statuses.append if statuses is not None else None
    async with TickSubscriber(settings, "strategy", on_status=on_status, snapshot=False) as sub:
        await sub.subscribe(CLAIMED, mode=mode, wait_live=False)
        expected = sum(1 for t in ticks if t["instrument_token"] in CLAIMED)
        async with asyncio.timeout(60):
            while sum(map(len, got.values())) < expected:
                for tick in await sub.batch(1000, wait=0.5):
                    got[tick["instrument_token"]].append(tick)
        await asyncio.wait_for(replay.done.wait(), 30)  # the last tick published
        assert sub.missed == 0 and not sub.gaps
    assert not task.done()  # serving on: the strategy's release above was answered
    stop.set()
    await asyncio.wait_for(task, 30)
    assert replay.report.sent == expected and replay.report.skipped == steps_of(ticks, INSTRUMENTS[4].token)
    assert replay.report.given_up == 0 and replay.report.unarrived == 0
    return got, replay.report


def steps_of(ticks: list[dict], token: int) -> int:
    return sum(1 for t in ticks if t["instrument_token"] == token)


async def test_a_replay_gives_a_strategy_the_recorded_ticks_in_order_the_same_every_time(
    redis_url: str, tmp_path: Path
) -> None:
    write_recording(tmp_path, steps=60, every_ns=2_000_000)
    recorded = read_recording(tmp_path)
    first, report = await play(redis_url, "replay1", tmp_path, "quote", speed=None)
    second, _ = await play(redis_url, "replay2", tmp_path, "quote", speed=None)
    assert report.holes == 0 and report.rate > 0
    for token in CLAIMED:
        mine = [t for t in recorded if t["instrument_token"] == token]
        mode = min("quote", RECORDED_MODES[token], key=codec.MODE_RANK.__getitem__)  # at most the recorded
        assert [_stable(t) for t in first[token]] == [in_mode(t, mode) for t in mine]
        assert [t["mode"] for t in first[token]] == [mode] * len(mine)
        assert [t["seq"] for t in first[token]] == list(range(1, len(mine) + 1))  # stamped afresh
        assert [_stable(t) for t in second[token]] == [_stable(t) for t in first[token]]
    full = [t for t in recorded if t["instrument_token"] == CLAIMED[0]]
    assert [t["last_price"] for t in first[CLAIMED[0]]] == [t["last_price"] for t in full]


@pytest.mark.parametrize(("speed", "steps"), [(1.0, 40), (None, 2000)])
async def test_a_recorded_stale_period_comes_back_as_one_and_no_tick_is_lost(
    redis_url: str, tmp_path: Path, speed: float | None, steps: int
) -> None:
    # at speed 1: 1 s, stale from 0.25 s to 0.75 s; at max, the hole has many steps behind it
    write_recording(tmp_path, steps=steps, every_ns=25_000_000, stale=(steps // 4, steps * 3 // 4))
    statuses: list[StreamStatus] = []
    got, report = await play(redis_url, "replay3", tmp_path, "full", speed=speed, statuses=statuses)
    assert report.holes == 1
    seen = [(s.status) for s in statuses if CLAIMED[0] in s.tokens]
    assert "stale" in seen and seen[-1] == "live"  # stale while the hole lasts, then live again
    recorded = read_recording(tmp_path)
    for token in CLAIMED:  # every token, those that shared the dropped session too
        mine = [t for t in recorded if t["instrument_token"] == token]
        assert [_stable(t) for t in got[token]] == [in_mode(t, RECORDED_MODES[token]) for t in mine]


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kitebus", "replay", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


async def test_kitebus_replay_subscribe_at_max_speed_plays_every_token_and_says_its_rate(
    redis_url: str, tmp_path: Path
) -> None:
    write_recording(tmp_path, steps=100, every_ns=1_000_000)
    ticks = read_recording(tmp_path)
    env = {**os.environ, "REDIS_URL": redis_url, "KITEBUS_LOG_LEVEL": "WARNING"}
    async with TickSubscriber(load_settings(redis_url=redis_url, namespace="replay4"), "listener",
                              snapshot=False) as sub:  # fmt: skip
        await sub.listen(RECORDED_MODES)
        args = ("--subscribe", "--speed", "max", "--exit", "--namespace", "replay4")
        proc = _cli(str(tmp_path), *args, env=env)
        got: list[dict] = []
        async with asyncio.timeout(60):
            while len(got) < len(ticks):
                got += await sub.batch(1000, wait=0.5)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err
    assert sorted(map(_canonical, got)) == sorted(map(_canonical, ticks))  # every token, in its own mode
    assert f"{len(ticks)} ticks sent, 0 of unclaimed tokens skipped, 0 given up by the publisher" in err
    assert "ticks/s" in err


@pytest.mark.parametrize(("args", "says"), [
    (["--speed", "0"], "--speed must be above 0"),
    (["--speed", "fast"], "--speed must be a number or 'max'"),
    (["--from", "25:00"], "not a time of day"),
    (["--from", "FAR", "--to", "FAR+1"], "no ticks recorded between FAR:00:00 and FAR+1:00:00 (IST)"),
])  # fmt: skip
def test_bad_input_exits_2_and_says_why(redis_url: str, tmp_path: Path, args: list[str], says: str) -> None:
    write_recording(tmp_path, steps=2, every_ns=1_000_000)
    far = (dt.datetime.now(IST).hour + 12) % 24  # an hour of the day twelve hours from this recording's
    args = [a.replace("FAR+1", f"{far:02d}:59").replace("FAR", f"{far:02d}:00") for a in args]
    says = says.replace("FAR+1:00", f"{far:02d}:59").replace("FAR", f"{far:02d}")
    env = {**os.environ, "REDIS_URL": redis_url}
    proc = _cli(str(tmp_path), *args, env=env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and says in err, err


def test_a_directory_with_no_recording_exits_2(redis_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    for root, says in ((tmp_path / "missing", "is not a directory"), (tmp_path, "no ticks recorded under")):
        proc = _cli(str(root), env=env)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and says in err, err


async def test_a_namespace_another_replay_leads_is_refused_and_a_used_one_starts_afresh(
    redis_url: str, tmp_path: Path, rds: redis.Redis
) -> None:
    write_recording(tmp_path, steps=2, every_ns=1_000_000)
    ticks, holes = load(tmp_path, None, None)
    first = Replay(replay_settings(redis_url, "replay5"), ticks, holes, speed=None, subscribe=True)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    try:
        await asyncio.wait_for(first.done.wait(), 30)  # it claimed everything, played, serves on
        proc = _cli(str(tmp_path), "--namespace", "replay5", env={**os.environ, "REDIS_URL": redis_url})
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 2 and "has a publisher of its own" in err, err
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert await rds.exists("replay5:claims:replay")  # its standing claims outlive it...
    second = Replay(replay_settings(redis_url, "replay5"), ticks, holes, speed=None)
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    try:
        await asyncio.wait_for(second.ready.wait(), 30)
        assert not await rds.exists("replay5:claims:replay")  # ...until the next replay starts afresh
        assert second.publisher is not None and second.publisher.book.claims == {}
        assert second.report.sent == 0 and not second.done.is_set()  # waiting for a claim of its own
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
