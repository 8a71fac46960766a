"""``kitebus demo`` under a pseudo-terminal: live prices on screen, Ctrl-C cleans up."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from kitebus.localredis import free_port

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _read_until(fd: int, pattern: re.Pattern[str], timeout: float, output: str = "") -> str:
    """Screen text (escape codes removed) once ``pattern`` shows in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                output += ANSI.sub("", os.read(fd, 65536).decode(errors="replace"))
            except OSError:
                break
            if pattern.search(output):
                return output
    raise AssertionError(f"no {pattern.pattern!r} on screen in {timeout}s; got:\n{output[-3000:]}")


def test_demo_shows_live_prices_and_order_updates_and_ctrl_c_leaves_nothing_behind() -> None:
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TERM": "xterm-256color"}
    env.pop("KITEBUS_NAMESPACE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitebus", "demo"], stdin=follower, stdout=follower, stderr=follower,
        env=env, start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    try:
        screen = _read_until(leader, re.compile(r"NSE:INFY\s+│\s+408065\s+│\s+[\d,]+\.\d\d"), 60)
        screen = _read_until(leader, re.compile(r"│\s+2\s+│\s+live\s+│"), 20, screen)
        # the simulator's random orders, through the publisher and the bus, in the table of the latest
        statuses = "OPEN|UPDATE|COMPLETE|CANCELLED|REJECTED"
        order_row = rf"order updates \(latest first\)[\s\S]*│\s+\d{{15}}\s+│\s+({statuses})"
        screen = _read_until(leader, re.compile(order_row), 30, screen)
        started = re.search(r"private redis-server on 127\.0\.0\.1:(\d+) \(pid (\d+), dir (\S+)\)", screen)
        assert started, screen[:2000]
        redis_pid, redis_dir = int(started.group(2)), Path(started.group(3))
        demo_dir = Path(re.search(r"KITEBUS_INSTRUMENTS=(\S+)/instruments\.csv", screen).group(1))
        assert redis_dir.is_dir() and demo_dir.is_dir()

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        # read while it stops: a full terminal would hold its last redraw, and it with it
        rest = _read_until(leader, re.compile("everything it started is gone"), 20)
        assert proc.wait(timeout=5) == 0
        assert "Traceback" not in rest
        assert not Path(f"/proc/{redis_pid}").exists() or _zombie(redis_pid)
        assert not redis_dir.exists() and not demo_dir.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(leader)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
