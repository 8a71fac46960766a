"""Simulator flood rate: full-mode ticks/s it puts on a loopback socket.

    .venv/bin/python bench/simulator.py [--connections 3] [--tokens 3000] [--ticks 300000]

The client counts packets from each frame's header only, so the figure is the simulator's
(and the socket's), not a decoder's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from websockets.asyncio.client import connect

from simulator.server import TickerServer


async def run(connections: int, tokens: int, ticks: int) -> None:
    async with TickerServer(rate=0.01) as server:
        url = f"{server.url}?api_key=kitebus&access_token=simulator"
        counts = [0] * connections

        async def client(i: int, ready: asyncio.Event) -> None:
            wanted = [(i * tokens + n + 1) << 8 | 1 for n in range(tokens)]
            async with connect(url, max_size=None) as ws:
                await ws.send(json.dumps({"a": "subscribe", "v": wanted}))
                await ws.send(json.dumps({"a": "mode", "v": ["full", wanted]}))
                ready.set()
                while counts[i] < ticks:
                    frame = await ws.recv()
                    if isinstance(frame, bytes) and len(frame) > 1:
                        counts[i] += int.from_bytes(frame[:2], "big")

        readies = [asyncio.Event() for _ in range(connections)]
        tasks = [asyncio.create_task(client(i, readies[i])) for i in range(connections)]
        for ready in readies:
            await ready.wait()
        while len(server.sessions) < connections or any(
            len(s.modes) < tokens or "quote" in s.modes.values() for s in server.sessions
        ):
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        sent = await server.flood(ticks)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        print(f"connections={connections} tokens/conn={tokens} mode=full")
        print(f"sent={sent} received={sum(counts)} seconds={elapsed:.2f} "
              f"rate={sum(counts) / elapsed:,.0f} ticks/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--ticks", type=int, default=300_000, help="per connection")
    args = parser.parse_args()
    asyncio.run(run(args.connections, args.tokens, args.ticks))


if __name__ == "__main__":
    main()
