"""``kitebus record`` as a process, against a running simulator and publisher, checked
against what an independent TickSubscriber saw on the bus."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from consumers.recorder import read_events, read_recording
from consumers.subscriber import TickSubscriber
from tests.integration.conftest import eventually

INFY, RELIANCE = 408065, 884737


async def start_recorder(redis_url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "record", *args,
        env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


class Watcher:
    """An independent subscriber collecting every tick it sees, in a task."""

    def __init__(self, sub: TickSubscriber) -> None:
        self.sub = sub
        self.ticks: list[dict] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for tick in self.sub:
            self.ticks.append(tick)

    def of(self, token: int) -> dict[int, float]:
        return {t["seq"]: t["last_price"] for t in self.ticks if t["instrument_token"] == token}


async def listeners(rds, token: int) -> int:
    return (await rds.pubsub_numsub(f"kite:ticks:{token}"))[0][1]


async def stop(proc: asyncio.subprocess.Process, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode, err.decode()


async def test_records_every_token_carried_as_an_independent_subscriber_saw_it(
    publisher, control, redis_url, rds, tmp_path
) -> None:
    proc = await start_recorder(redis_url, str(tmp_path), "--flush", "0.3")
    async with TickSubscriber(redis_url, client="watch", snapshot=False) as sub:
        await sub.listen([INFY, RELIANCE])
        watcher = Watcher(sub)
        await control.subscribe([INFY, RELIANCE], mode="full", client="t")  # followed by the recorder
        async def recorder_listens() -> bool:
            return await listeners(rds, RELIANCE) >= 2  # the watcher and the recorder

        await eventually(recorder_listens, timeout=10)
        await eventually(lambda: len(read_recording(tmp_path)) >= 40, timeout=20)
        code, err = await stop(proc, signal.SIGTERM)
        watcher.task.cancel()
    assert code == 0, err
    recorded = read_recording(tmp_path)
    for token in (INFY, RELIANCE):
        mine = [t for t in recorded if t["instrument_token"] == token]
        seqs = [t["seq"] for t in mine]
        assert len(mine) >= 10 and seqs == sorted(seqs)
        assert seqs == list(range(seqs[0], seqs[-1] + 1))  # nothing missing in between
        seen = watcher.of(token)
        common = [s for s in seqs if s in seen]
        assert len(common) >= 10
        assert all(seen[t["seq"]] == t["last_price"] for t in mine if t["seq"] in seen)
        assert mine[0]["mode"] == "full" and len(mine[0]["depth"]["buy"]) == 5
        assert mine[0]["ohlc"].keys() == {"open", "high", "low", "close"}
    kinds = [e["kind"] for e in read_events(tmp_path)]
    assert kinds[0] == "start" and kinds[-1] == "stop" and "gap" not in kinds


async def test_sigkill_leaves_readable_files_and_loses_at_most_the_last_flush(
    publisher, control, redis_url, rds, tmp_path
) -> None:
    flush = 0.3
    await control.subscribe([INFY], mode="quote", client="t")
    async with TickSubscriber(redis_url, client="watch", snapshot=False) as sub:
        await sub.listen([INFY])
        watcher = Watcher(sub)
        proc = await start_recorder(redis_url, str(tmp_path), "408065", "--flush", str(flush))
        await eventually(lambda: len(list(tmp_path.rglob("ticks-*.parquet"))) >= 10, timeout=20)
        killed_ns = time.time_ns()
        proc.kill()
        await proc.wait()
        watcher.task.cancel()
    files = list(tmp_path.rglob("*.parquet"))
    assert files and all(pq.read_table(path).num_rows > 0 for path in files)  # every final name is whole
    recorded = {t["seq"]: t["last_price"] for t in read_recording(tmp_path)}
    first = min(recorded)
    # every tick on the bus before the last flush interval (and a margin for scheduling) is there
    bound_ns = killed_ns - int((flush + 1.0) * 1e9)
    due = [t for t in watcher.ticks if t["seq"] >= first and t["received_at_ns"] < bound_ns]
    assert len(due) >= 3
    assert [t["seq"] for t in due if t["seq"] not in recorded] == []
    assert all(recorded[t["seq"]] == t["last_price"] for t in due)


async def test_sigterm_flushes_and_stream_status_is_recorded(
    publisher, control, redis_url, rds, simulator, tmp_path
) -> None:
    await control.subscribe([INFY], mode="ltp", client="t")
    proc = await start_recorder(redis_url, str(tmp_path / "new" / "dir"), "NSE:INFY", "--flush", "60")
    async with TickSubscriber(redis_url, client="watch", snapshot=False) as sub:
        await sub.listen([INFY])
        watcher = Watcher(sub)
        async def recorder_listens() -> bool:
            return await listeners(rds, INFY) >= 2 and len(watcher.ticks) >= 1

        await eventually(recorder_listens, timeout=15)
        simulator.drop()  # the connection goes stale, then live again
        await eventually(lambda: len(watcher.ticks) >= 15 and sub.status.get(INFY) == "live", timeout=20)
        code, err = await stop(proc, signal.SIGTERM)
        watcher.task.cancel()
    assert code == 0, err
    recorded = read_recording(tmp_path / "new" / "dir")  # nothing was flushed before SIGTERM (60 s)
    ltp = [t for t in recorded if t["mode"] == "ltp"]  # (Kite sends quote until the mode is set)
    assert len(recorded) >= 10 and len(ltp) >= 5
    assert not any("volume_traded" in t or "depth" in t for t in ltp)  # ltp mode: those are null
    kinds = [(e["kind"], e["token"]) for e in read_events(tmp_path / "new" / "dir")]
    assert ("stale", INFY) in kinds and ("live", INFY) in kinds
    assert kinds.index(("stale", INFY)) < kinds.index(("live", INFY))


async def test_a_directory_that_cannot_be_written_exits_2_with_a_clear_message(redis_url, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = await start_recorder(redis_url, str(blocker / "recording"))
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert f"kitebus record: {blocker / 'recording'} is not writable" in err.decode()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs of its own, to fill up for real (skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory) -> None:
    """Write until the filesystem is full."""
    with open(directory / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def test_a_full_disk_stops_the_recorder_loudly_and_keeps_its_files(
    publisher, control, redis_url, small_disk
) -> None:
    await control.subscribe([INFY], mode="full", client="t")
    proc = await start_recorder(redis_url, str(small_disk / "rec"), "408065", "--flush", "0.2")
    await eventually(lambda: list(small_disk.rglob("ticks-*.parquet")), timeout=20)
    fill(small_disk)
    _, err = await asyncio.wait_for(proc.communicate(), 20)  # it stops by itself
    assert proc.returncode == 1
    assert "STOPPED" in err.decode() and "No space left on device" in err.decode()
    kept = list(small_disk.rglob("ticks-*.parquet"))
    assert kept and all(pq.read_table(path).num_rows > 0 for path in kept)
    assert read_recording(small_disk / "rec")


async def test_a_recorder_cut_off_by_redis_writes_the_cut_down_and_goes_on(
    publisher, control, redis_url, rds, tmp_path
) -> None:
    await control.subscribe([INFY], mode="quote", client="t")
    proc = await start_recorder(redis_url, str(tmp_path), "408065", "--flush", "0.2")
    try:
        await eventually(lambda: len(read_recording(tmp_path)) >= 3, timeout=20)
        assert await rds.client_kill_filter(_type="pubsub") >= 1  # as Redis does to a slow reader
        await eventually(lambda: any(e["kind"] == "cut" for e in read_events(tmp_path)), timeout=20)
        cut_at = next(e["at"] for e in read_events(tmp_path) if e["kind"] == "cut")
        await eventually(lambda: any(t["recorded_at_ns"] > cut_at for t in read_recording(tmp_path)))
    finally:
        code, err = await stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "was cut off by Redis" in err
