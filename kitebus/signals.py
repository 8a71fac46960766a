"""Waiting for SIGINT/SIGTERM inside asyncio."""

from __future__ import annotations

import asyncio
import signal


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
