"""Valid requests under a flood of garbage requests: their latency, and the publisher's
rate of answering garbage beside the rate one writer can add it.

    .venv/bin/python bench/control_flood.py [--seconds 10] [--writers 1]

A private redis-server, the simulator and ``python -m publisher`` each in a process of
their own. A valid subscribe/unsubscribe pair is timed every 50 ms, first alone, then
while ``--writers`` processes XADD garbage (binary junk, bad tokens, oversized fields)
as fast as pipelines of 100 let them. The stream is answered in order, so a valid
request waits for the garbage ahead of it: what bounds its wait is how fast garbage is
answered compared with how fast it can be written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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


def _garbage(rng: random.Random) -> dict[str, bytes | str]:
    kind = rng.randrange(4)
    if kind == 0:
        return {"op": rng.randbytes(8), "tokens": rng.randbytes(30)}
    if kind == 1:
        return {"op": "subscribe", "tokens": "12x,abc", "client": "junk"}
    if kind == 2:
        return {"op": "subscribe", "tokens": "1", "client": "x" * 200}
    return {"op": "mode", "tokens": "1", "mode": "deep"}


async def write_garbage(url: str, seconds: float) -> None:
    """One writer process: pipelines of 100 garbage XADDs until time is up."""
    client, keys, rng = redis.from_url(url), Keys(NS), random.Random(os.getpid())
    written, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(100):
                pipe.xadd(keys.control, _garbage(rng))
            await pipe.execute()
        written += 100
    print(written, flush=True)
    await client.aclose()


async def _time_valid(control: ControlClient, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await control.subscribe([1 << 8 | 1], client="valid", timeout=120)
        await control.unsubscribe([1 << 8 | 1], client="valid", timeout=120)
        latencies.append((time.perf_counter() - started) * 1000 / 2)
        await asyncio.sleep(0.05)
    return sorted(latencies)


def _figures(values: list[float]) -> str:
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    p50 = statistics.median(values)
    return f"p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  max {values[-1]:8.2f} ms  (n={len(values)})"


async def bench(seconds: float, writers: int) -> None:
    server = LocalRedis()
    server.start()
    simulator = publisher = None
    try:
        simulator, url = await start_simulator(rate=1)
        publisher = await start_publisher(url, server.url, NS, "ERROR")
        client = redis.from_url(server.url)
        control = ControlClient(client, NS)
        keys = Keys(NS)
        await control.subscribe([2 << 8 | 1], client="warmup", timeout=30)
        alone = await _time_valid(control, seconds / 2)

        flood = [
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--write-garbage", server.url, "--seconds", str(seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(writers)
        ]
        started = time.monotonic()
        timing = asyncio.create_task(_time_valid(control, seconds))
        written = sum([int((await p.communicate())[0]) for p in flood])
        stopped = time.monotonic()
        under_flood = await timing
        while (await client.xinfo_groups(keys.control))[0]["lag"]:  # entries not yet read
            await asyncio.sleep(0.05)
        await control.unsubscribe([1 << 8 | 1], client="valid", timeout=120)  # behind the last of them
        drained = time.monotonic()
        await client.aclose()
        print(f"# {os.cpu_count()} cpus; {writers} garbage writer(s) for {seconds:g} s, "
              "a valid request pair every 50 ms")  # fmt: skip
        print(f"valid request alone         {_figures(alone)}")
        print(f"valid request under flood   {_figures(under_flood)}")
        print(f"garbage written   {written / (stopped - started):10,.0f} /s  ({written:,} in all)")
        print(f"garbage answered  {written / (drained - started):10,.0f} /s  "
              f"(the backlog was gone {drained - stopped:.2f} s after the writers stopped)")
    finally:
        await stop(publisher, simulator)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--write-garbage", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_garbage:
        asyncio.run(write_garbage(args.write_garbage, args.seconds))
    else:
        asyncio.run(bench(args.seconds, args.writers))


if __name__ == "__main__":
    main()
