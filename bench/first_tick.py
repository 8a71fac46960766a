"""Request -> first tick on the channel, and request -> the ``live`` follow-up, p50 / p99.

    .venv/bin/python bench/first_tick.py [--requests 200]

The publisher (``python -m publisher``) and the simulator each run in a process of their
own, with a private redis-server. For each request a fresh instrument's channel is
SUBSCRIBEd first, then the subscribe request is XADDed; the clock stops at the first
message on the channel and at the ``live`` entry in the results stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import redis.asyncio as redis

from bench.stack import start_publisher, start_simulator, stop
from config import Keys
from consumers.control import ControlClient
from kitebus.localredis import LocalRedis

NS = "bench"


async def bench(requests: int) -> None:
    server = LocalRedis()
    server.start()
    simulator = publisher = None
    try:
        simulator, url = await start_simulator(rate=0.2)
        publisher = await start_publisher(url, server.url, NS, "WARNING")
        client = redis.from_url(server.url)
        control = ControlClient(client, NS)
        keys = Keys(NS)
        await control.subscribe([1 << 8 | 1], client="warmup", timeout=30)
        to_tick: list[float] = []
        to_live: list[float] = []
        for n in range(requests):
            token = (1000 + n) << 8 | 1
            pubsub = client.pubsub()
            await pubsub.subscribe(keys.ticks(token))
            await pubsub.get_message(timeout=1)  # the confirmation
            started = time.perf_counter()
            result = await control.subscribe([token], client="bench")
            while await pubsub.get_message(ignore_subscribe_messages=True, timeout=5) is None:
                pass
            to_tick.append((time.perf_counter() - started) * 1000)
            live = await control.wait_live(result)
            assert live.ok, live.error
            to_live.append((time.perf_counter() - started) * 1000)
            await pubsub.aclose()
        await client.aclose()
        print(f"# {os.cpu_count()} cpus; {requests} subscribe requests, one new instrument each, in turn")
        for name, values in (("request -> first tick on the channel", to_tick), ("request -> live", to_live)):
            values.sort()
            p50, p99 = statistics.median(values), values[min(len(values) - 1, int(0.99 * len(values)))]
            print(f"{name:38} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {values[-1]:6.2f} ms")
    finally:
        await stop(publisher, simulator)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    asyncio.run(bench(parser.parse_args().requests))


if __name__ == "__main__":
    main()
