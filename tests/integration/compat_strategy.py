"""One small strategy, written against Kite's KiteTicker API, run with either ticker.

Usage: python compat_strategy.py official WS_URL MARKERS_JSON
       python compat_strategy.py bus MARKERS_JSON        (the bus from REDIS_URL / KITEBUS_NAMESPACE)

It subscribes every token of MARKERS (token -> a marker last_price), sets full on some and
ltp on one, keeps the first tick of each token whose last_price is its marker and whose
mode is the one it asked for (a tick can land between the subscribe and the mode
change, with either ticker, as with Kite), and prints
{"ticks": {token: {field: [type, value]}}, "errors": [...], "batches": n} once it has them
all. The only line that differs between the two runs is the import.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime
from typing import Any

kind = sys.argv[1]
if kind == "official":
    from kiteconnect import KiteTicker
    from twisted.internet import reactor

    url, markers_json = sys.argv[2], sys.argv[3]
    ticker = KiteTicker("kitebus", "simulator", root=url, reconnect=False)
else:
    from consumers.kiteticker import KiteTicker  # the one-line migration

    markers_json = sys.argv[2]
    ticker = KiteTicker("kitebus", "simulator", client="compat-strategy")

MARKERS = {int(k): v for k, v in json.loads(markers_json).items()}
FULL, LTP = [408065, 256265], [424961]
seen: dict[int, Any] = {}
errors: list[str] = []
done = threading.Event()


def describe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [describe(v) for v in value]
    if isinstance(value, datetime):
        return ["datetime", value.isoformat()]
    return [type(value).__name__, value]


def finish() -> None:
    if done.is_set():
        return
    done.set()
    print(json.dumps({"ticks": seen, "errors": errors}), flush=True)
    if kind == "official":
        reactor.callFromThread(reactor.stop)
    else:
        ticker.close()


def on_connect(ws, response) -> None:
    ws.subscribe(list(MARKERS))
    ws.set_mode(ws.MODE_FULL, FULL)
    ws.set_mode(ws.MODE_LTP, LTP)


def on_ticks(ws, ticks) -> None:
    for tick in ticks:
        token = tick["instrument_token"]
        wanted = "full" if token in FULL else "ltp" if token in LTP else "quote"
        if tick["last_price"] == MARKERS.get(token) and tick["mode"] == wanted and token not in seen:
            seen[token] = describe(tick)
    if len(seen) == len(MARKERS):
        finish()


def on_error(ws, code, reason) -> None:
    errors.append(f"{code}: {reason}")


ticker.on_connect = on_connect
ticker.on_ticks = on_ticks
ticker.on_error = on_error
timer = threading.Timer(40, finish)
timer.daemon = True
timer.start()
ticker.connect()
