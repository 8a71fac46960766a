"""The processes a benchmark runs against, each on its own: the simulator and the publisher."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def measured_on() -> str:
    """``commit <short sha>`` of the code measured (``+ changes`` when the tracked files
    differ from it), for the header of a benchmark's report."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return "commit unknown (not a git checkout)"
    return f"commit {sha}" + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


_Process = tuple[int, str]  # pid and start time: a pid is used again by later processes
_THREAD_NS: dict[_Process, dict[str, int]] = {}  # thread id -> its last schedstat reading
_ENDED_NS: dict[_Process, int] = {}  # nanoseconds of threads whose id was taken again
_FIRST: dict[_Process, tuple[float, float]] = {}  # (clock ticks, exact) at the first reading


def cpu_seconds(pid: int) -> float:
    """CPU time a running process has used, all its threads: the scheduler's nanosecond
    count of each thread (``/proc/<pid>/task/*/schedstat``), a thread that has ended keeping
    what it had when this function last saw it. A thread that started and ended between two
    readings is seen only by the process's own count (``/proc/<pid>/stat``), in clock ticks
    with user and system time each rounded down: where that count has grown by more than two
    ticks beyond the exact one since the first reading, the excess counts too. So readings
    are exact until such a thread is missed, and to a clock tick or two after it (the
    benchmarks' publishers, Redis and consumers start none during a burst)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    ticks = (int(fields[11]) + int(fields[12])) * tick
    process = (pid, fields[19])
    seen = _THREAD_NS.setdefault(process, {})
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                ns = int(schedstat.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that has just ended; no schedstat
            continue
        if ns < seen.get(task, 0):  # a new thread under an ended one's id
            _ENDED_NS[process] = _ENDED_NS.get(process, 0) + seen[task]
        seen[task] = ns
    exact = (sum(seen.values()) + _ENDED_NS.get(process, 0)) / 1e9
    first_ticks, first_exact = _FIRST.setdefault(process, (ticks, exact))
    unseen = (ticks - first_ticks) - (exact - first_exact) - 2 * tick
    return exact + max(0.0, unseen)


async def start_simulator(rate: float) -> tuple[asyncio.subprocess.Process, str]:
    """``kitebus simulate`` on a free port; returns the process and its ``KITE_WS_URL``."""
    simulator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "simulate", "--port", "0", "--rate", str(rate),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert simulator.stdout is not None
    while True:  # "simulator: KITE_WS_URL=ws://127.0.0.1:PORT"
        line = (await simulator.stdout.readline()).decode()
        if not line:
            raise RuntimeError("the simulator exited before it served")
        if "KITE_WS_URL=" in line:
            return simulator, line.split("KITE_WS_URL=", 1)[1].strip()


async def start_publisher(
    ws_url: str, redis_url: str, namespace: str, log_level: str
) -> asyncio.subprocess.Process:
    """``python -m publisher`` against the simulator's default account."""
    env = {
        **os.environ, "KITE_WS_URL": ws_url, "REDIS_URL": redis_url, "KITE_API_KEY": "kitebus",
        "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": namespace, "KITEBUS_LOG_LEVEL": log_level,
    }  # fmt: skip
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "publisher", env=env)


async def stop(*processes: asyncio.subprocess.Process | None) -> None:
    """SIGTERM each that still runs, and wait for it."""
    for process in processes:
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()
