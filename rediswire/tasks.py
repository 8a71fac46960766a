"""Asyncio helpers every process uses: owned tasks (the object that starts one cancels
and awaits it), waiting for a stop or a signal, and a backoff between retries."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

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


async def wait_for_stop_signal() -> signal.Signals:
    """Return when SIGINT or SIGTERM arrives (the handlers are removed again)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
    try:
        return await received
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` in a new event loop; SIGINT/SIGTERM set ``stop``."""

    async def run() -> None:
        stop = asyncio.Event()
        waiter = asyncio.create_task(wait_for_stop_signal())
        waiter.add_done_callback(lambda _: stop.set())
        try:
            await main(stop)
        finally:
            await cancel_and_wait(waiter)

    asyncio.run(run())
