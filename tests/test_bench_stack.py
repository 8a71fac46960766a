"""The benchmarks' CPU clock counts every thread of a process, ended ones too, finer than clock ticks."""

from __future__ import annotations

import os
import threading
import time

from bench.stack import cpu_seconds


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_every_thread_to_the_millisecond() -> None:
    pid = os.getpid()
    before, process_before = cpu_seconds(pid), time.process_time()
    spun, done = threading.Event(), threading.Event()

    def worker() -> None:
        _spin(0.05)
        spun.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    _spin(0.05)
    assert spun.wait(10)
    used, process_used = cpu_seconds(pid) - before, time.process_time() - process_before
    assert used >= 0.095  # both threads' 50 ms: the worker's is not missed
    assert abs(used - process_used) < 0.003  # the process's own nanosecond clock agrees
    done.set()
    thread.join()
    after = cpu_seconds(pid) - before
    assert used <= after < used + 0.05  # the ended thread keeps what it had used, exactly
