"""Owned background tasks: the object that starts one cancels and awaits it; and the
supervisor every long-lived one runs under (``supervised``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publisher.health import Health

log = logging.getLogger("kitebus.tasks")


async def cancel_and_wait(task: asyncio.Future[None] | None, retry: float = 0.5) -> None:
    """Cancel ``task`` (if any) and wait until it has finished.

    The cancel is repeated every ``retry`` seconds: redis-py's asyncio client can
    swallow a CancelledError that lands inside a command, and the task would then run
    on; the next cancel lands elsewhere (a sleep, a socket read) and ends it.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry)
    if not task.cancelled():
        task.exception()  # retrieved: the owner decides whether it matters


async def run_until(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends or ``stop`` is set (then it is cancelled); its error is raised."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(stopper)
        await cancel_and_wait(task)
    if not task.cancelled():
        task.result()


class Backoff:
    """Growing waits between retries of a failing call, from ``base`` to ``cap`` seconds,
    back to ``base`` after a success (``reset``): Redis back means work resumes at once."""

    def __init__(self, base: float = 0.1, cap: float = 1.0) -> None:
        self.base, self.cap = base, cap
        self.delay = base

    def reset(self) -> None:
        self.delay = self.base

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.cap, self.delay * 2)


class PublisherFailed(Exception):
    """A task kept crashing: the publisher gave up (``Health.fail``); the process exits 1."""


async def supervised(
    name: str,
    factory: Callable[[], Awaitable[None]],
    health: Health,
    *,
    restarts: int | None = None,
    window: float | None = None,
    settle: float | None = None,
    done: Callable[[], bool] | None = None,
) -> None:
    """Run ``factory()`` until cancelled, restarting it after it crashes.

    A crash is an exception other than CancelledError, or a return while ``done()`` is
    not true (``done`` None: the task must never return). Each is logged, counted in
    ``health`` (the publisher is ``degraded`` naming the task until the new run has lasted
    ``settle`` seconds) and followed by a growing wait and a new ``factory()`` call, on
    the same objects, so no state is lost. More than ``restarts`` crashes within
    ``window`` seconds: ``health.fail`` with the reason, and this returns. Cancellation
    goes straight through and counts for nothing. The defaults come from ``health``.
    """
    restarts = health.max_restarts if restarts is None else restarts
    window = health.restart_window if window is None else window
    settle = health.settle if settle is None else settle
    backoff = Backoff(*health.restart_backoff)
    crashes: deque[float] = deque()
    loop = asyncio.get_running_loop()
    restarted = False
    while True:
        settled: asyncio.TimerHandle | None = None
        if restarted:

            def recovered() -> None:
                backoff.reset()
                health.recovered(name)

            settled = loop.call_later(settle, recovered)
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = describe_crash(exc)
            log.error("task crashed task=%s error=%s", name, reason, exc_info=exc)
        else:
            if done is not None and done():
                return
            reason = "returned, but it should run until stopped"
            log.error("task crashed task=%s error=%s", name, reason)
        finally:
            if settled is not None:
                settled.cancel()
        now = time.monotonic()
        crashes.append(now)
        while crashes and crashes[0] < now - window:
            crashes.popleft()
        if len(crashes) > restarts:
            health.fail(f"task {name} crashed {len(crashes)} times in {window:g}s, last: {reason}")
            return
        health.crashed(name, reason)
        await backoff.wait()
        log.warning("task restarted task=%s restarts=%d", name, health.restarts[name])
        restarted = True


def describe_crash(exc: BaseException) -> str:
    """``Type: message`` of the one exception inside (nested) groups, cut short."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    return " ".join(text.split())[:200]
