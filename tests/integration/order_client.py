"""Collect order updates through ``on_order_update`` with Kite's official KiteTicker or the
drop-in; print "connected" once connected, then the updates as JSON once it has N.

Usage: python order_client.py official WS_URL N
       python order_client.py bus N        (the bus from REDIS_URL / KITEBUS_NAMESPACE)
"""

from __future__ import annotations

import json
import sys
import threading

kind = sys.argv[1]
if kind == "official":
    from kiteconnect import KiteTicker
    from twisted.internet import reactor

    ticker = KiteTicker("kitebus", "simulator", root=sys.argv[2], reconnect=False)
    wanted = int(sys.argv[3])
else:
    from consumers.kiteticker import KiteTicker

    ticker = KiteTicker("kitebus", "simulator", client="order-client")
    wanted = int(sys.argv[2])

updates: list[dict] = []
done = threading.Event()


def finish() -> None:
    if done.is_set():
        return
    done.set()
    print(json.dumps(updates), flush=True)
    if kind == "official":
        reactor.callFromThread(reactor.stop)
    else:
        ticker.close()


def on_connect(ws, response) -> None:
    print("connected", flush=True)


def on_order_update(ws, data) -> None:
    updates.append(data)
    if len(updates) == wanted:
        finish()


ticker.on_connect = on_connect
ticker.on_order_update = on_order_update
timer = threading.Timer(40, finish)
timer.daemon = True
timer.start()
ticker.connect()
