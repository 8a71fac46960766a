"""The recorder's files without Redis: parts, compaction, events, and what the reader skips."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consumers import recorder
from consumers.recorder import DiskFull, ParquetSink, Recorder, read_events, read_recording

FIVE_MIN_NS = 300 * 10**9


def tick(seq: int, token: int = 1, epoch: int = 7, mode: str = "ltp", **fields: object) -> dict:
    return {"instrument_token": token, "mode": mode, "tradable": True, "last_price": 100.0 + seq,
            "received_at_ns": time.time_ns(), "seq": seq, "epoch": epoch, **fields}  # fmt: skip


def record(sink: ParquetSink, *ticks: dict) -> Recorder:
    rec = Recorder(sink)
    for t in ticks:
        rec.take(t, time.time_ns())
    return rec


def test_each_flush_is_a_closed_part_and_a_window_over_is_compacted(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    now = time.time_ns()
    day, window = sink.window(now)
    record(sink, tick(1), tick(2))
    sink.flush(now)
    record(sink, tick(3))
    sink.flush(now)
    names = sorted(p.name for p in (tmp_path / day).iterdir())
    assert names == [f"ticks-{window}-0001.parquet", f"ticks-{window}-0002.parquet"]
    assert [t["seq"] for t in read_recording(tmp_path)] == [1, 2, 3]
    sink.flush(now + FIVE_MIN_NS)  # nothing new, but the window is over
    assert [p.name for p in (tmp_path / day).iterdir()] == [f"ticks-{window}.parquet"]
    assert [t["seq"] for t in read_recording(tmp_path)] == [1, 2, 3]


def test_parts_beside_their_compacted_file_are_not_read_twice(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    now = time.time_ns()
    day, window = sink.window(now)
    record(sink, tick(1))
    sink.flush(now)
    part = tmp_path / day / f"ticks-{window}-0001.parquet"
    (tmp_path / day / f"ticks-{window}.parquet").write_bytes(part.read_bytes())  # cut before the unlink
    assert [t["seq"] for t in read_recording(tmp_path)] == [1]
    ParquetSink(tmp_path).compact()  # the next recorder removes the leftovers
    assert not part.exists() and [t["seq"] for t in read_recording(tmp_path)] == [1]


def test_a_restarted_recorder_continues_the_part_numbers(tmp_path: Path) -> None:
    now = time.time_ns()
    for seq in (1, 2):
        sink = ParquetSink(tmp_path)
        record(sink, tick(seq))
        sink.flush(now)
    assert [t["seq"] for t in read_recording(tmp_path)] == [1, 2]


def test_gaps_and_epoch_changes_are_events(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    record(sink, tick(1), tick(2), tick(6), tick(1, epoch=8), tick(5, token=2), tick(3, token=2))
    sink.flush()
    events = [(e["kind"], e["token"], e["from_seq"], e["to_seq"]) for e in read_events(tmp_path)]
    assert events == [("gap", 1, 3, 5), ("epoch", 1, 6, 1), ("gap", 2, 1, 2)]  # token 2: seq anew


def test_full_ticks_keep_depth_and_ohlc_and_ltp_ticks_leave_them_out(tmp_path: Path) -> None:
    level = {"quantity": 10, "price": 99.5, "orders": 2}
    full = tick(1, mode="full", ohlc={"open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5},
                depth={"buy": [level] * 5, "sell": [level] * 5}, volume_traded=1000)  # fmt: skip
    sink = ParquetSink(tmp_path)
    record(sink, full, tick(2, token=2))
    sink.flush()
    got = read_recording(tmp_path)
    assert {k: v for k, v in got[0].items() if k != "recorded_at_ns"} == full
    assert "depth" not in got[1] and "volume_traded" not in got[1]
    table = pq.read_table(next(tmp_path.rglob("ticks-*.parquet")))
    assert table.schema.field("depth").type == recorder.TICK_SCHEMA.field("depth").type


def test_start_and_end_bound_the_receive_time(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    rec = Recorder(sink)
    for seq, at in ((1, 100), (2, 200), (3, 300)):
        rec.take(tick(seq), at)
    sink.flush()
    assert [t["seq"] for t in read_recording(tmp_path, start=200)] == [2, 3]
    assert [t["seq"] for t in read_recording(tmp_path, start=100, end=300)] == [1, 2]


def test_a_damaged_part_is_left_uncompacted_and_the_rest_goes_on(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    now = time.time_ns()
    day, window = sink.window(now)
    record(sink, tick(1))
    sink.flush(now)
    (tmp_path / day / f"ticks-{window}-0009.parquet").write_bytes(b"garbage")
    sink.flush(now + FIVE_MIN_NS)  # no exception: the window stays in parts
    assert (tmp_path / day / f"ticks-{window}-0001.parquet").exists()
    with pytest.warns(UserWarning, match="0009"):
        assert [t["seq"] for t in read_recording(tmp_path)] == [1]


def test_corrupt_and_foreign_parquet_files_are_named_and_skipped(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path)
    record(sink, tick(1))
    sink.flush()
    day = next(p for p in tmp_path.iterdir() if p.is_dir())
    (day / "ticks-235900-0001.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"price": [1.0]}), day / "ticks-235800.parquet")
    pq.write_table(pa.table({"x": [1]}), day / "ticks-notes.parquet")
    with pytest.warns(UserWarning) as caught:
        got = read_recording(tmp_path)
    assert [t["seq"] for t in got] == [1]
    named = " ".join(str(w.message) for w in caught)
    for name in ("ticks-235900-0001.parquet", "ticks-235800.parquet", "ticks-notes.parquet"):
        assert name in named


def test_a_full_disk_raises_and_keeps_what_was_written(tmp_path: Path, monkeypatch) -> None:
    sink = ParquetSink(tmp_path)
    record(sink, tick(1))
    sink.flush()

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recorder.pq, "write_table", no_space)
    record(sink, tick(2))
    with pytest.raises(DiskFull, match="No space left on device"):
        sink.flush()
    monkeypatch.undo()
    assert not list(tmp_path.rglob("*.tmp"))
    assert [t["seq"] for t in read_recording(tmp_path)] == [1]
