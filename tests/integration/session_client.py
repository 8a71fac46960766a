"""A strategy process that claims instruments through the library, for tests to kill or close.

Usage: python session_client.py KIND CLIENT TOKENS
       (the bus from REDIS_URL / KITEBUS_NAMESPACE, the timeout from KITEBUS_CLIENT_TIMEOUT)

KIND is ``subscriber`` (TickSubscriber), ``blocking`` (BlockingTickSubscriber) or
``kiteticker`` (the drop-in). It claims TOKENS (comma separated) as CLIENT, prints
``ready`` once the publisher has applied the claim, then waits for a line on standard
input: on ``close`` it closes (the drop-in: ``close()``) and exits at once with
``os._exit(0)``, so nothing runs after the close, not even the interpreter's own exit.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

from consumers.kiteticker import KiteTicker
from consumers.subscriber import BlockingTickSubscriber, TickSubscriber

kind, client, tokens = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
url, namespace = os.environ["REDIS_URL"], os.environ.get("KITEBUS_NAMESPACE", "kite")


def ready() -> None:
    print("ready", flush=True)


def wait_for_close() -> None:
    if sys.stdin.readline().strip() != "close":
        os._exit(3)


async def subscriber() -> None:
    async with TickSubscriber(url, client, namespace=namespace) as sub:
        await sub.subscribe(tokens, wait_live=False)
        ready()
        await asyncio.to_thread(wait_for_close)


if kind == "subscriber":
    asyncio.run(subscriber())
elif kind == "blocking":
    with BlockingTickSubscriber(url, client, namespace=namespace) as sub:
        sub.subscribe(tokens)
        ready()
        wait_for_close()
else:
    ticker = KiteTicker(redis_url=url, namespace=namespace, redis_cluster=False, client=client)
    ticked = threading.Event()
    ticker.on_connect = lambda ws, response: ws.subscribe(tokens)
    ticker.on_ticks = lambda ws, ticks: ticked.set()  # a tick: the claim was applied
    ticker.connect(threaded=True)
    ticked.wait(30)
    ready()
    wait_for_close()
    ticker.close()
os._exit(0)
