"""Follow a whole watchlist and append every tick to a CSV file.

    REDIS_URL=... python -m consumers.examples.record_watchlist ticks.csv 408065 256265 --mode quote

An example of the blocking library: plain synchronous code, a callback per tick.
"""

from __future__ import annotations

import argparse
import csv
from typing import Any

from config import load_settings
from consumers.subscriber import BlockingTickSubscriber

COLUMNS = ["received_at_ns", "instrument_token", "mode", "last_price", "volume_traded", "change"]


def record(path: str, tokens: list[str], mode: str, limit: int) -> int:
    """Write ticks until ``limit`` (0: until interrupted); returns how many were written."""
    written = 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        if handle.tell() == 0:
            writer.writeheader()

        def on_tick(tick: dict[str, Any]) -> None:
            nonlocal written
            writer.writerow(tick)
            written += 1
            if written == limit:
                raise StopIteration

        with BlockingTickSubscriber(load_settings(), client="recorder") as sub:
            sub.subscribe(tokens, mode=mode)
            try:
                sub.run(on_tick)
            except KeyboardInterrupt:
                pass
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="CSV file to append to")
    parser.add_argument("tokens", nargs="+", help="instrument tokens or EXCHANGE:SYMBOL")
    parser.add_argument("--mode", default="quote", choices=["ltp", "quote", "full"])
    parser.add_argument("--count", type=int, default=0, help="stop after this many ticks (0: never)")
    args = parser.parse_args()
    print(f"wrote {record(args.path, args.tokens, args.mode, args.count)} ticks to {args.path}")


if __name__ == "__main__":
    main()
