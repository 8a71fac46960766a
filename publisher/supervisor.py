"""The supervisor every long-lived task of the publisher runs under (``supervised``):
a crash is restarted on the same objects and reported; one that keeps crashing gives up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from rediswire.tasks import Backoff

if TYPE_CHECKING:
    from publisher.health import Health

log = logging.getLogger("kitebus.tasks")


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
