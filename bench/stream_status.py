"""Time from a fault at the Kite side to ``stale`` at a consumer, and back to ``live``.

    .venv/bin/python bench/stream_status.py [--drops 5] [--stalls 3]

The simulator and the publisher (default timings: a 5 s stall watchdog) run in this
process with a private redis-server; a TickSubscriber listens to 30 instruments spread
over the three connections. Each fault hits one connection; the consumer's ``on_status``
callback is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from config import load_settings
from consumers.subscriber import StreamStatus, TickSubscriber
from kitebus.localredis import LocalRedis
from publisher.app import Publisher
from simulator.server import TickerServer


async def timed(sub: TickSubscriber, events: list, status: str, tokens: set[int], since: float) -> float:
    while True:
        await sub.batch(limit=100_000, wait=0.02)
        for at, event in events:
            if event.status == status and set(event.tokens) >= tokens and at >= since:
                return (at - since) * 1000


async def bench(drops: int, stalls: int) -> None:
    server = LocalRedis()
    server.start()
    try:
        async with TickerServer(rate=5, heartbeat_interval=1.0) as simulator:
            settings = load_settings(
                kite_ws_url=simulator.url, redis_url=server.url, kite_api_key="kitebus",
                kite_access_token="simulator",
            )  # fmt: skip
            publisher = Publisher(settings)
            await publisher.start()
            events: list[tuple[float, StreamStatus]] = []
            try:
                tokens = [(n << 8) | 1 for n in range(1, 31)]
                async with TickSubscriber(
                    server.url, client="bench", on_status=lambda e: events.append((time.perf_counter(), e))
                ) as sub:
                    await sub.control.subscribe(tokens, mode="quote", client="bench")
                    await sub.listen(tokens)
                    results: dict[str, list[float]] = {
                        "drop -> stale": [], "stalled -> stale": [], "-> live again": [],
                    }  # fmt: skip
                    for fault in ["drop"] * drops + ["stall"] * stalls:
                        while not all(c.stream == "live" for c in publisher.connections):
                            await sub.batch(wait=0.05)
                        session = simulator.sessions[0]
                        victims = set(session.modes)
                        since = time.perf_counter()
                        if fault == "drop":
                            simulator.drop(session.id)
                        else:
                            simulator.stall(60, session.id)
                        name = "drop -> stale" if fault == "drop" else "stalled -> stale"
                        results[name].append(await timed(sub, events, "stale", victims, since))
                        stale_at = time.perf_counter()
                        results["-> live again"].append(await timed(sub, events, "live", victims, stale_at))
            finally:
                await publisher.stop()
        print(f"# {os.cpu_count()} cpus; stall watchdog 5 s; ms from the fault to the consumer's callback")
        for name, values in results.items():
            if values:
                print(f"{name:18} median {statistics.median(values):8.1f}  min {min(values):8.1f}  "
                      f"max {max(values):8.1f}  ({len(values)} faults)")  # fmt: skip
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--stalls", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(bench(args.drops, args.stalls))


if __name__ == "__main__":
    main()
