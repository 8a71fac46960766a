"""How fast ``kitebus replay --speed max`` plays a recording onto the bus, with the ticks a
listener received and, measured in the same run, the bus's own PUBLISH rate of such ticks.

    .venv/bin/python bench/replay.py [--ticks 200000] [--tokens 1000] [--runs 3]

A recording of ``--ticks`` full ticks over ``--tokens`` instruments is written as
``kitebus record`` writes one (the simulator's market through the publisher's encoder, 500
ticks received together every millisecond). Each run is ``kitebus replay DIR --subscribe
--speed max --exit`` (a process of its own: simulator, publisher and player) into a private
redis-server, while a raw hiredis counter (another process) counts the ticks on the bus.
The private Redis's pub/sub output-buffer limit is lifted: what is measured is the replay,
not how fast one listener drains. The limit beside it: a feeder PUBLISHing the same
payloads, pipelined, 500 a batch (bench/record.py's feeder, unthrottled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import msgpack

from bench.consumer import NS
from bench.record import feed
from bench.stack import measured_on
from consumers.recorder import ParquetSink
from kitebus.localredis import LocalRedis
from kitewire import codec
from simulator.market import Market

STEP = 500  # ticks the recorder received together


def write_recording(root: Path, ticks: int, tokens: int) -> None:
    market = Market(2)
    sink = ParquetSink(root, roll_seconds=3600)
    start = time.time_ns() - ticks // STEP * 1_000_000
    seqs: dict[int, int] = {}
    for n in range(ticks):
        token = (n % tokens + 1) << 8 | 1
        at = start + n // STEP * 1_000_000
        packet = codec.encode_packet(market.tick(token, "full", at // 10**9))
        seqs[token] = seqs.get(token, 0) + 1
        frame = codec.encode_frame([packet])
        _, payload = codec.PAYLOAD_WRITERS[len(packet)].write(frame, 4, at, seqs[token], 1)
        sink.ticks.append({**msgpack.unpackb(payload), "recorded_at_ns": at})
        if len(sink.ticks) >= 50_000:
            sink.flush()
    sink.flush()


async def run_once(port: int, root: Path) -> dict[str, float]:
    counter = await asyncio.create_subprocess_exec(  # bench/consumer.py's raw hiredis counter
        sys.executable, os.path.join(os.path.dirname(__file__), "consumer.py"), "--consume", str(port), "0",
        "0", "--raw", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert counter.stdout is not None
    assert (await counter.stdout.readline()).strip() == b"ready"
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "KITEBUS_LOG_LEVEL": "WARNING"}
    started = time.perf_counter()
    replay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", "replay", str(root), "--subscribe", "--speed", "max", "--exit",
        "--namespace", NS, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await replay.communicate()
    wall = time.perf_counter() - started
    text = err.decode()
    found = re.search(r"(\d+) ticks sent.* (\d+) given up by the publisher.* ([\d,]+) ticks/s", text)
    if replay.returncode != 0 or found is None:
        raise RuntimeError(f"kitebus replay failed ({replay.returncode}): {text[-2000:]}")
    counted = json.loads(await counter.stdout.readline())["ticks"]
    await counter.wait()
    return {"sent": int(found[1]), "given_up": int(found[2]), "rate": float(found[3].replace(",", "")),
            "wall": wall, "heard": counted}  # fmt: skip


async def bench(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="kitebus-bench-replay-"))
    server = LocalRedis(extra=("--client-output-buffer-limit", "pubsub 0 0 0"))
    server.start()
    try:
        write_recording(root, args.ticks, args.tokens)
        print(f"# {measured_on()}; {os.cpu_count()} cpus; {args.ticks:,} full ticks over {args.tokens:,} "
              "tokens; replay and listener: processes of their own; pub/sub buffer limit lifted")  # fmt: skip
        print(f"{'run':>3} {'sent':>9} {'heard':>9} {'lost: publisher':>15} {'listener':>8} "
              f"{'replay ticks/s':>15} {'wall s':>7}")
        for run in range(1, args.runs + 1):
            r = await run_once(server.port, root)
            at_listener = r["sent"] - r["given_up"] - r["heard"]  # published, not heard (or cut)
            print(f"{run:>3} {r['sent']:>9,} {r['heard']:>9,} {r['given_up']:>15,} {at_listener:>8,} "
                  f"{r['rate']:>15,.0f} {r['wall']:>7.1f}", flush=True)  # fmt: skip
        limit = await asyncio.to_thread(feed, server.port, min(args.ticks, 100_000), args.tokens, 10**9)
        print(f"limit: the bus takes {limit:,.0f} full ticks/s PUBLISHed pipelined (no listener)")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# "wall s": the whole command, start-up (reading the files, the publisher's start) included


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
