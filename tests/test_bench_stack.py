"""The benchmarks' CPU clock counts every thread of a process, ended ones too, finer than clock ticks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.stack import cpu_seconds

# A fresh process (no thread of it has ended before the first reading, as in a publisher
# the benchmarks start): on each line read it does the next step and answers with its own
# process_time (every thread, the kernel's nanosecond count).
_CHILD = textwrap.dedent(
    """
    import sys, threading, time

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def answer():
        print(time.process_time(), flush=True)

    spun, done = threading.Event(), threading.Event()

    def worker():
        spin(0.05)
        spun.set()
        done.wait(10)

    answer()
    sys.stdin.readline()
    thread = threading.Thread(target=worker)
    thread.start()
    spin(0.05)
    spun.wait(10)
    answer()
    sys.stdin.readline()
    done.set()
    thread.join()
    answer()
    sys.stdin.readline()
    """
)


def test_cpu_seconds_counts_every_thread_to_the_millisecond() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        readings = []
        for _ in range(3):  # idle, both threads spun, the worker ended
            own = float(child.stdout.readline())
            readings.append((cpu_seconds(child.pid), own))
            child.stdin.write("\n")
            child.stdin.flush()
        (before, own_before), (spun, own_spun), (ended, own_ended) = readings
        assert spun - before >= 0.095  # both threads' 50 ms: the worker's is not missed
        assert abs((spun - before) - (own_spun - own_before)) < 0.003  # to the millisecond
        assert abs((ended - before) - (own_ended - own_before)) < 0.003  # the ended thread kept
    finally:
        child.kill()
        child.wait()
