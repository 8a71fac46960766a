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

from config import Keys
from consumers.control import ControlClient
from kitebus.localredis import LocalRedis

NS = "bench"


async def bench(requests: int) -> None:
    server = LocalRedis()
    server.start()
    simulator = publisher = None
    try:
        simulator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kitebus", "simulate", "--port", "0", "--rate", "0.2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert simulator.stdout is not None
        url = ""
        while not url:  # "simulator: KITE_WS_URL=ws://127.0.0.1:PORT"
            line = (await simulator.stdout.readline()).decode()
            if "KITE_WS_URL=" in line:
                url = line.split("KITE_WS_URL=", 1)[1].strip()
        env = {
            **os.environ, "KITE_WS_URL": url, "REDIS_URL": server.url, "KITE_API_KEY": "kitebus",
            "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": NS, "KITEBUS_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        publisher = await asyncio.create_subprocess_exec(sys.executable, "-m", "publisher", env=env)
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
        for proc in (publisher, simulator):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    asyncio.run(bench(parser.parse_args().requests))


if __name__ == "__main__":
    main()
