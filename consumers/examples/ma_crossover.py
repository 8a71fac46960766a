"""A moving-average crossover on one instrument's last price, printing its signals.

    REDIS_URL=... python -m consumers.examples.ma_crossover 408065 --fast 5 --slow 20

An example of the async library: subscribe, iterate, react. It trades nothing.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

from config import load_settings
from consumers.subscriber import TickSubscriber


class Crossover:
    """Signals ``buy`` when the fast average crosses above the slow one, ``sell`` below."""

    def __init__(self, fast: int, slow: int) -> None:
        if not 0 < fast < slow:
            raise ValueError("need 0 < fast < slow")
        self.fast: deque[float] = deque(maxlen=fast)
        self.slow: deque[float] = deque(maxlen=slow)
        self._above: bool | None = None

    def update(self, price: float) -> str | None:
        self.fast.append(price)
        self.slow.append(price)
        if len(self.slow) < self.slow.maxlen:  # type: ignore[operator]
            return None
        above = sum(self.fast) / len(self.fast) > sum(self.slow) / len(self.slow)
        signal = None if self._above is None or above == self._above else ("buy" if above else "sell")
        self._above = above
        return signal


async def run(token: str, fast: int, slow: int, ticks: int) -> None:
    strategy = Crossover(fast, slow)
    async with TickSubscriber(load_settings(), client="ma-crossover") as sub:
        await sub.subscribe([token], mode="ltp")
        seen = 0
        async for tick in sub:
            signal = strategy.update(tick["last_price"])
            if signal:
                print(f"{signal} {tick['instrument_token']} at {tick['last_price']}", flush=True)
            seen += 1
            if seen == ticks:
                break
    print(f"done after {seen} ticks", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("token", help="instrument token or EXCHANGE:SYMBOL")
    parser.add_argument("--fast", type=int, default=5)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--ticks", type=int, default=0, help="stop after this many ticks (0: never)")
    args = parser.parse_args()
    try:
        asyncio.run(run(args.token, args.fast, args.slow, args.ticks))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
