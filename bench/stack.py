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


_THREAD_NS: dict[int, dict[str, int]] = {}  # pid -> thread id -> its last schedstat reading
_ENDED_NS: dict[int, int] = {}  # pid -> nanoseconds of its threads whose id was taken again


def cpu_seconds(pid: int) -> float:
    """CPU time a running process has used, all its threads. ``/proc/<pid>/stat`` counts the
    whole process (ended threads too) but in clock ticks (10 ms), too coarse for a short
    burst's ratio; the scheduler's nanosecond count (``/proc/<pid>/task/*/schedstat``)
    is exact for each thread, and a thread that has ended keeps the count it had when this
    function last saw it. The larger of the two is the nearest."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    seen = _THREAD_NS.setdefault(pid, {})
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
            _ENDED_NS[pid] = _ENDED_NS.get(pid, 0) + seen[task]
        seen[task] = ns
    return max(ticks, (sum(seen.values()) + _ENDED_NS.get(pid, 0)) / 1e9)


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
