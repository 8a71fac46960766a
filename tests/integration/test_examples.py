"""The example strategies run against the real stack."""

from __future__ import annotations

import asyncio
import csv
import os
import sys

from consumers.examples.ma_crossover import Crossover


def test_crossover_signals_on_the_cross() -> None:
    strategy = Crossover(2, 4)
    signals = [strategy.update(p) for p in [10, 11, 12, 13, 9, 8, 12, 14, 15]]
    assert [s for s in signals if s] == ["sell", "buy"]


async def _run(redis_url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, env={**os.environ, "REDIS_URL": redis_url, "KITEBUS_NAMESPACE": "kite"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def test_ma_crossover_runs(publisher, redis_url) -> None:
    out = await _run(redis_url, "consumers.examples.ma_crossover", "408065", "--fast", "2", "--slow", "3",
                     "--ticks", "10")  # fmt: skip
    assert "done after 10 ticks" in out
    assert publisher.book.claims == {}  # released on exit


async def test_recorder_writes_csv(publisher, redis_url, tmp_path) -> None:
    path = tmp_path / "ticks.csv"
    out = await _run(redis_url, "consumers.examples.record_watchlist", str(path), "408065", "256265",
                     "--count", "8")  # fmt: skip
    assert "wrote 8 ticks" in out
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 8 and {r["instrument_token"] for r in rows} <= {"408065", "256265"}
    assert all(float(r["last_price"]) > 0 for r in rows)
    assert publisher.book.claims == {}
