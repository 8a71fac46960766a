"""Run Kite's official KiteTicker against a URL; print what it saw as JSON, then exit.

Usage: python official_client.py WS_URL API_KEY ACCESS_TOKEN
Subscribes INFY and NIFTY 50, waits for their quote ticks, switches both to full, waits
for full ticks (with depth for INFY), then prints {"quote": [...], "full": [...]}.
"""

from __future__ import annotations

import json
import sys

from kiteconnect import KiteTicker
from twisted.internet import reactor

url, api_key, access_token = sys.argv[1:4]
TOKENS = [408065, 256265]
seen: dict[str, dict[int, dict]] = {"quote": {}, "full": {}}
errors: list[str] = []
ticker = KiteTicker(api_key, access_token, root=url, reconnect=False)


def finish(code: int) -> None:
    print(json.dumps({"quote": list(seen["quote"].values()), "full": list(seen["full"].values()),
                      "errors": errors}, default=str))  # fmt: skip
    sys.stdout.flush()
    reactor.callLater(0, reactor.stop)
    ticker.exit_code = code


def on_connect(ws, response) -> None:
    ws.subscribe(TOKENS)


def on_ticks(ws, ticks) -> None:
    for tick in ticks:
        if tick["instrument_token"] in TOKENS and tick["mode"] in seen:
            seen[tick["mode"]].setdefault(tick["instrument_token"], tick)
    if len(seen["quote"]) == len(TOKENS) and not seen["full"]:
        ws.set_mode(ws.MODE_FULL, TOKENS)
    if len(seen["full"]) == len(TOKENS):
        finish(0)


def on_error(ws, code, reason) -> None:
    errors.append(f"{code}: {reason}")


ticker.on_connect = on_connect
ticker.on_ticks = on_ticks
ticker.on_error = on_error
ticker.exit_code = 1
reactor.callLater(30, finish, 1)
ticker.connect()
sys.exit(ticker.exit_code)
