"""The benchmarks' CPU clock counts every thread of a process, ended ones too, finer than clock ticks."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time

from bench.stack import cpu_seconds

# A fresh process, as the benchmarks start: a thread of it has ended before the first
# reading (which puts its clock-tick count ahead of the threads' own), and on each line read
# it does the next step and answers with its own process_time (every thread, in ns).
_CHILD = textwrap.dedent(
    """
    import sys, threading, time

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def answer():
        print(time.process_time(), flush=True)
        sys.stdin.readline()

    early = threading.Thread(target=spin, args=(0.03,))
    early.start()
    early.join()
    answer()
    spun, done = threading.Event(), threading.Event()

    def worker():
        spin(0.05)
        spun.set()
        done.wait(30)

    thread = threading.Thread(target=worker)
    thread.start()
    spin(0.05)
    assert spun.wait(30)
    answer()  # both threads spun 50 ms, the worker still alive
    done.set()
    thread.join()
    answer()  # the worker ended
    for _ in range(5):
        spin(0.013)
        answer()  # the main thread alone, in steps that are no whole number of clock ticks
    burst = threading.Thread(target=spin, args=(0.1,))
    burst.start()
    burst.join()
    answer()  # a thread that started and ended between two readings
    """
)


def _asleep(pid: int) -> None:
    """Until the child waits on its stdin: a running thread's count lags the scheduler's."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        time.sleep(0.001)
    raise AssertionError("the child never went to sleep")


def test_cpu_seconds_counts_every_thread_to_the_millisecond() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    tick = 1 / os.sysconf("SC_CLK_TCK")
    try:
        readings = []
        for _ in range(9):
            line = child.stdout.readline()
            assert line, "the child failed"
            _asleep(child.pid)
            readings.append((cpu_seconds(child.pid), float(line)))
            child.stdin.write("\n")
            child.stdin.flush()
        assert readings[1][0] - readings[0][0] >= 0.095  # both threads' 50 ms: none missed
        for (before, own_before), (after, own_after) in itertools.pairwise(readings[:-1]):
            assert abs((after - before) - (own_after - own_before)) < 0.002  # exact, ended or not
        (before, own_before), (after, own_after) = readings[-2:]
        burst = own_after - own_before  # the unseen thread's 100 ms, seen in clock ticks
        # the excess over two ticks of slack, itself read off two floored counts: 4 ticks short at most
        assert burst - 4 * tick - 0.002 < after - before < burst + 0.002
    finally:
        child.kill()
        child.wait()
