"""End to end: simulator flood -> publisher -> real Redis -> a consumer of every channel.

    .venv/bin/python bench/publisher.py [--ticks 200000] [--tokens 9000] [--mode full]

Separate processes: the publisher (``python -m publisher``), a private redis-server, and a
consumer that PSUBSCRIBEs ``{ns}:ticks:*`` and counts messages with hiredis (no msgpack
decode, so it keeps up; Redis cuts a pub/sub client whose buffer passes 32 MB). The
simulator runs in this process. Loss is counted at the consumer and split by where it
happened: dropped inside the publisher (its status hash) or lost between Redis and the
consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis
import redis.asyncio as redis

from config import Keys
from consumers.control import ControlClient
from kitebus.localredis import LocalRedis
from publisher.resp import pack_command
from simulator.server import TickerServer

NS = "bench"


def consume(port: int, expected: int, idle: float) -> None:
    """The consumer process: count pmessages until ``expected`` or ``idle`` seconds of quiet."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(pack_command("PSUBSCRIBE", Keys(NS).ticks_pattern))
    reader = hiredis.Reader()
    sock.settimeout(idle)
    count, first, last = 0, 0.0, 0.0
    ready = False
    try:
        while count < expected:
            data = sock.recv(1 << 20)
            if not data:
                print("consumer: redis closed the connection (output buffer limit?)", file=sys.stderr)
                break
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if reply[0] == b"pmessage":
                    count += 1
                    last = time.perf_counter()
                    first = first or last
                elif not ready:
                    ready = True
                    print("ready", flush=True)
    except TimeoutError:
        pass
    print(f"{count} {last - first:.6f}", flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(ticks: int, tokens: int, mode: str) -> None:
    server = LocalRedis()
    server.start()
    keys = Keys(NS)
    rds = redis.from_url(server.url)
    publisher = consumer = None
    try:
        async with TickerServer(rate=0.01, max_rate=1) as simulator:
            env = {
                **os.environ, "KITE_WS_URL": simulator.url, "REDIS_URL": server.url,
                "KITE_API_KEY": "kitebus", "KITE_ACCESS_TOKEN": "simulator",
                "KITEBUS_NAMESPACE": NS, "KITEBUS_LOG_LEVEL": "WARNING",
            }  # fmt: skip
            publisher = await asyncio.create_subprocess_exec(sys.executable, "-m", "publisher", env=env)
            wanted = [(n << 8) | 1 for n in range(1, tokens + 1)]
            await ControlClient(rds, NS).subscribe(wanted, mode=mode, client="bench", timeout=60)
            async with asyncio.timeout(60):
                while sum(1 for s in simulator.sessions for m in s.modes.values() if m == mode) < tokens:
                    await asyncio.sleep(0.05)
            connections = len(simulator.sessions)
            per_connection = ticks // connections
            consumer = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--consume", str(server.port), str(per_connection * connections),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert consumer.stdout is not None
            assert (await consumer.stdout.readline()).strip() == b"ready"
            cpu_before = cpu_seconds(publisher.pid)
            started = time.perf_counter()
            sent = await simulator.flood(per_connection)
            flood_seconds = time.perf_counter() - started
            received_text, window = (await consumer.stdout.readline()).split()
            await consumer.wait()
            cpu = cpu_seconds(publisher.pid) - cpu_before
            status = {k.decode(): v.decode() for k, v in (await rds.hgetall(keys.status)).items()}
            counts = [await rds.hget(keys.conn(i), "reconnects") for i in range(connections)]
            reconnects = sum(int(count or 0) for count in counts)
            publisher.terminate()  # before the simulator goes, so it does not try to reconnect
            await publisher.wait()
        received = int(received_text)
        dropped = int(status.get("dropped", 0))
        malformed = int(status.get("malformed", 0))
        print(f"# {os.cpu_count()} cpus; {tokens} tokens in {mode} mode over {connections} connections")
        print(f"sent by simulator      {sent:>12,} ticks in {flood_seconds:.2f} s")
        print(f"received by consumer   {received:>12,} ticks")
        rate = received / float(window)
        print(f"end-to-end rate        {rate:>12,.0f} ticks/s (first to last tick at the consumer)")
        lost_after_redis = sent - received - dropped
        print(f"loss                   {sent - received:>12,} ticks (dropped in publisher {dropped:,}, "
              f"malformed {malformed:,}, lost after Redis {lost_after_redis:,})")  # fmt: skip
        print(f"publisher reconnects   {reconnects:>12,} during the run")
        print(f"publisher CPU          {cpu / max(received, 1) * 10_000 * 1000:>12.1f} ms per 10k ticks "
              f"({cpu:.2f} s CPU)")  # fmt: skip
    finally:
        for proc in (consumer, publisher):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
        await rds.aclose()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=300_000, help="ticks to flood in all")
    parser.add_argument("--tokens", type=int, default=9000)
    parser.add_argument("--mode", default="full", choices=["ltp", "quote", "full"])
    parser.add_argument("--consume", nargs=2, type=int, metavar=("PORT", "EXPECTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consume(args.consume[0], args.consume[1], idle=5.0)
    else:
        asyncio.run(bench(args.ticks, args.tokens, args.mode))


if __name__ == "__main__":
    main()
