"""What a consumer costs: TickSubscriber with and without conflated delivery, in CPU per 10k ticks.

    .venv/bin/python bench/consumer.py [--ticks 200000] [--tokens 9000] [--rate 20000]
                                       [--conflate-ms 250,1000]

A feeder process PUBLISHes real full-mode payloads (the publisher's own encoder) for
``--tokens`` instruments at a steady rate into a private redis-server; each consumer is a
process of its own listening to every token, and reports the ticks it was given and its
CPU time. Beside them, a raw hiredis counter that decodes nothing: the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis

from config import Keys
from kitebus.localredis import LocalRedis
from kitewire import codec
from kitewire.encoder import frame_encoder
from rediswire import resp
from simulator.market import Market

NS = "bench"


def feed(port: int, ticks: int, tokens: int, rate: int) -> None:
    """PUBLISH ``ticks`` payloads, 500 a batch, at ``rate`` ticks/s."""
    market, now = Market(1), int(time.time())
    packets = [codec.encode_packet(market.tick((n << 8) | 1, "full", now)) for n in range(1, tokens + 1)]
    encoder = frame_encoder(Keys(NS).ticks("").encode())
    frames = [codec.encode_frame(packets[i : i + 500]) for i in range(0, len(packets), 500)]
    sock = socket.create_connection(("127.0.0.1", port))
    reader = hiredis.Reader()
    sent, started = 0, time.perf_counter()
    while sent < ticks:
        publishes, _, count, _ = encoder.encode(frames[(sent // 500) % len(frames)], time.time_ns(), {})
        sock.sendall(publishes)
        replies = 0
        while replies < count:
            reader.feed(sock.recv(1 << 16))
            while reader.gets() is not False:
                replies += 1
        sent += count
        ahead = sent / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)


def consume(port: int, tokens: int, conflate_ms: float, raw: bool) -> None:
    """Listen to every token until 3 s of quiet after the first tick; print {"ticks": n, "cpu": s}."""
    if raw:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(resp.command("PSUBSCRIBE", Keys(NS).ticks_pattern))
        reader, count = hiredis.Reader(), 0
        print("ready", flush=True)
        try:
            while data := sock.recv(1 << 20):
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    count += reply[0] == b"pmessage"
                if count:  # the quiet that ends it counts from the first tick (a slow start waits)
                    sock.settimeout(3.0)
        except TimeoutError:
            pass
        print(json.dumps({"ticks": count, "cpu": time.process_time()}), flush=True)
        return

    from consumers.subscriber import TickSubscriber

    async def run() -> None:
        url = f"redis://127.0.0.1:{port}/0"
        async with TickSubscriber(url, namespace=NS, snapshot=False, conflate_ms=conflate_ms) as sub:
            await sub.listen([(n << 8) | 1 for n in range(1, tokens + 1)])
            print("ready", flush=True)
            count, quiet_since = 0, time.monotonic()
            while time.monotonic() - quiet_since < 3.0:
                got = len(await sub.batch(limit=10_000, wait=0.5))
                if got:
                    count, quiet_since = count + got, time.monotonic()
            print(json.dumps({"ticks": count, "cpu": time.process_time()}), flush=True)

    asyncio.run(run())


async def bench(args: argparse.Namespace) -> None:
    server = LocalRedis()
    server.start()
    try:
        kinds = [("raw hiredis counter", 0.0, True), ("TickSubscriber", 0.0, False)]
        for ms in map(float, args.conflate_ms.split(",")):
            kinds.append((f"TickSubscriber conflate_ms={ms:g}", ms, False))
        print(f"# {os.cpu_count()} cpus; {args.ticks:,} full ticks over {args.tokens:,} tokens at "
              f"{args.rate:,} ticks/s; one consumer at a time, a process of its own")  # fmt: skip
        print(f"{'consumer':36} {'ticks given':>12} {'cpu s':>7} {'cpu ms per 10k bus ticks':>25}")
        for name, conflate_ms, raw in kinds:
            consumer = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--consume", str(server.port), str(args.tokens), str(conflate_ms),
                *(["--raw"] if raw else []), stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert consumer.stdout is not None
            assert (await consumer.stdout.readline()).strip() == b"ready"
            await asyncio.to_thread(feed, server.port, args.ticks, args.tokens, args.rate)
            result = json.loads(await consumer.stdout.readline())
            await consumer.wait()
            per_10k = result["cpu"] / args.ticks * 10_000 * 1000
            print(f"{name:36} {result['ticks']:>12,} {result['cpu']:>7.2f} {per_10k:>25.1f}")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=9000)
    parser.add_argument("--rate", type=int, default=20_000, help="ticks per second the feeder sends")
    parser.add_argument("--conflate-ms", default="250,1000", help="conflation intervals to measure")
    parser.add_argument("--consume", nargs=3, metavar=("PORT", "N", "MS"), help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consume(int(args.consume[0]), int(args.consume[1]), float(args.consume[2]), args.raw)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
