"""One Python strategy reading every full tick at line rate: ticks/s, CPU and decode per tick.

    .venv/bin/python bench/strategy.py [--ticks 450000] [--tokens 9000] [--runs 3]
                                       [--kinds raw,subscriber,msgpack,python,kiteticker]

A feeder process PUBLISHes real full-mode payloads (the publisher's own encoder, ``seq``
and ``epoch`` included) for ``--tokens`` instruments as fast as a private redis-server
takes them (500 a batch, one batch in flight behind the one being sent). The pub/sub
output-buffer limit is lifted (``client-output-buffer-limit pubsub 0 0 0``): a consumer
slower than the feeder is not cut, the backlog waits in Redis and it reads on at its own
pace, so "ticks/s" is what the consumer takes in (or, when it is faster, what the feeder
and Redis send). Each consumer is a process of its own listening to every token:

- ``raw``: a hiredis counter, no decoding: the floor
- ``subscriber``: ``TickSubscriber.batch()`` as a strategy calls it (defaults), every tick
  a dict
- ``msgpack``: the same with every payload decoded by ``msgpack.unpackb`` (the library's
  decode before the fixed-shape decoder)
- ``python``: the same with ``KITEBUS_NO_SPEEDUPS=1`` (the pure-Python decoder, as on a
  machine without a compiler)
- ``kiteticker``: the ``KiteTicker`` drop-in's delivery (``on_ticks`` lists of official
  dicts) over the same subscriber; claims are not made (no publisher runs)

CPU is the consumer's user + system time from its first delivered batch to its last, per
tick delivered; "core" is that CPU time over the wall time (below 100%: the consumer waited,
for the feed or for a core shared with Redis, the feeder and anything else running). Loss:
ticks published minus ticks delivered, and the subscriber's ``missed`` (from ``seq``).
Decode is a micro-benchmark of one full payload, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis
import msgpack

from bench.stack import measured_on
from config import Keys
from kitebus.localredis import LocalRedis
from kitewire import codec
from kitewire.encoder import frame_encoder
from rediswire import resp
from simulator.market import Market

NS = "bench"
FEED_SIZE = 16 << 10  # bytes fed to hiredis at a time, as consumers/pubsub.py does
QUIET = 2.0  # seconds without a tick after which a consumer that lost some gives up waiting
KINDS = {
    "raw": "raw hiredis counter (the floor)",
    "subscriber": "TickSubscriber.batch()",
    "msgpack": "TickSubscriber.batch(), msgpack.unpackb",
    "python": "TickSubscriber.batch(), KITEBUS_NO_SPEEDUPS=1",
    "kiteticker": "KiteTicker drop-in (on_ticks)",
}


def tokens_of(count: int) -> list[int]:
    return [(n << 8) | 1 for n in range(1, count + 1)]


def full_payload() -> bytes:
    """One full-mode payload as the publisher writes it."""
    packet = codec.encode_packet(Market(1).tick(tokens_of(1)[0], "full", int(time.time())))
    _, payload = codec.PAYLOAD_WRITERS[len(packet)].write(packet, 0, time.time_ns(), 7, 1)
    return payload


def feed(port: int, ticks: int, tokens: int) -> None:
    """PUBLISH ``ticks`` full payloads as fast as Redis takes them; print {"published", "seconds"}."""
    market, now = Market(1), int(time.time())
    packets = [codec.encode_packet(market.tick(token, "full", now)) for token in tokens_of(tokens)]
    frames = [codec.encode_frame(packets[i : i + 500]) for i in range(0, len(packets), 500)]
    encoder = frame_encoder(Keys(NS).ticks("").encode(), epoch=1)
    sock = socket.create_connection(("127.0.0.1", port))
    sent = answered = 0
    started = time.perf_counter()
    while sent < ticks:
        frame = frames[(sent // 500) % len(frames)]
        publishes, _, count, _ = encoder.encode(frame, time.time_ns(), {})
        sock.sendall(publishes)
        sent += count
        while answered < sent - 500:  # the batch before this one answered: one in flight
            answered += resp.replies_in(sock.recv(1 << 16))
    while answered < sent:
        answered += resp.replies_in(sock.recv(1 << 16))
    print(json.dumps({"published": sent, "seconds": time.perf_counter() - started}), flush=True)


class Meter:
    """Ticks delivered, timed from the first batch (whose ticks are not counted) to the last."""

    def __init__(self) -> None:
        self.ticks = 0
        self.started = self.cpu = self.last = 0.0
        self.last_cpu = 0.0

    def add(self, count: int) -> None:
        now = time.perf_counter()
        if not self.started:
            self.started, self.cpu = now, time.process_time()
        else:
            self.ticks += count
        self.last, self.last_cpu = now, time.process_time()

    def quiet(self) -> bool:
        return bool(self.started) and time.perf_counter() - self.last > QUIET

    def report(self, delivered: int, missed: int = 0) -> None:
        seconds, cpu = self.last - self.started, self.last_cpu - self.cpu
        print(json.dumps({
            "delivered": delivered, "missed": missed, "rate": self.ticks / seconds if seconds else 0.0,
            "cpu_us": cpu / self.ticks * 1e6 if self.ticks else 0.0,
            "core": cpu / seconds if seconds else 0.0,
        }), flush=True)  # fmt: skip


def consume_raw(port: int, tokens: int, expected: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    channels = [Keys(NS).ticks(t) for t in tokens_of(tokens)]
    for i in range(0, len(channels), 1000):
        sock.sendall(resp.command("SUBSCRIBE", *channels[i : i + 1000]))
    reader, confirmed = hiredis.Reader(), 0
    while confirmed < len(channels):
        reader.feed(sock.recv(1 << 16))
        while reader.gets() is not False:
            confirmed += 1
    print("ready", flush=True)
    meter, count = Meter(), 0
    sock.settimeout(0.5)
    while count < expected and not meter.quiet():
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        got = 0
        for start in range(0, len(data), FEED_SIZE):  # as the library feeds hiredis
            reader.feed(data[start : start + FEED_SIZE])
            while (reply := reader.gets()) is not False:
                got += reply[0] == b"message"
        count += got
        meter.add(got)
    meter.report(count)


async def consume(port: int, tokens: int, expected: int, kind: str) -> None:
    from consumers.subscriber import TickSubscriber

    url = f"redis://127.0.0.1:{port}/0"
    async with TickSubscriber(url, namespace=NS, snapshot=False) as sub:
        if kind == "msgpack":
            sub._decode = msgpack.unpackb  # type: ignore[attr-defined]
        await sub.listen(tokens_of(tokens))
        print("ready", flush=True)
        meter, count = Meter(), 0
        if kind == "kiteticker":
            delivered = await deliver_to_kiteticker(sub, url, tokens, expected, meter)
            meter.report(delivered, sub.missed)
            return
        while count + sub.missed < expected and not meter.quiet():
            got = len(await sub.batch())
            if got:
                count += got
                meter.add(got)
        meter.report(count, sub.missed)


async def deliver_to_kiteticker(sub: object, url: str, tokens: int, expected: int, meter: Meter) -> int:
    """The drop-in's own delivery task (``KiteTicker._deliver``) over ``sub``, every token in
    full mode, until ``expected`` ticks reached ``on_ticks`` (or were missed); returns how
    many did."""
    from consumers.kiteticker import KiteTicker

    ticker = KiteTicker(redis_url=url, namespace=NS, redis_cluster=False, client="bench", client_timeout=60)
    ticker.subscribed_tokens = dict.fromkeys(tokens_of(tokens), "full")
    done = asyncio.Event()
    seen = [0]

    def on_ticks(ws: KiteTicker, ticks: list[dict]) -> None:
        seen[0] += len(ticks)
        meter.add(len(ticks))
        if seen[0] + sub.missed >= expected:  # type: ignore[attr-defined]
            done.set()

    ticker.on_ticks = on_ticks
    task = asyncio.create_task(ticker._deliver(sub))  # type: ignore[arg-type]
    while not done.is_set() and not meter.quiet():
        try:
            await asyncio.wait_for(done.wait(), 0.5)
        except TimeoutError:
            pass
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return seen[0]


def decode_us() -> dict[str, float]:
    """µs to decode one full payload, best of 5 rounds of 20,000."""
    payload = full_payload()
    paths = {"msgpack.unpackb": msgpack.unpackb}
    try:
        from consumers import payloads
    except ImportError:  # a checkout from before the fixed-shape decoder
        payloads = None  # type: ignore[assignment]
    if payloads is not None:
        paths["library (python)"] = payloads.python_decoder()
        if payloads.SPEEDUPS:
            paths["library (C)"] = payloads.decode
    return {
        name: min(timeit.repeat(lambda fn=fn: fn(payload), number=20_000, repeat=5)) / 20_000 * 1e6
        for name, fn in paths.items()
    }


def run_once(server: LocalRedis, args: argparse.Namespace, kind: str) -> dict:
    env = {**os.environ, **({"KITEBUS_NO_SPEEDUPS": "1"} if kind == "python" else {})}
    consumer = subprocess.Popen(
        [sys.executable, __file__, "--consume", str(server.port), str(args.tokens), str(args.ticks), kind],
        stdout=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    assert consumer.stdout is not None
    try:
        assert consumer.stdout.readline().strip() == "ready", f"{kind}: the consumer did not start"
        feeder = subprocess.run(
            [sys.executable, __file__, "--feed", str(server.port), str(args.ticks), str(args.tokens)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(consumer.stdout.readline())
    except BaseException:  # a failed feed or start must not leave the consumer waiting forever
        consumer.kill()
        raise
    finally:
        consumer.wait()
    fed = json.loads(feeder.stdout)
    result["published"] = fed["published"]
    result["feed_rate"] = fed["published"] / fed["seconds"]
    result["lost"] = fed["published"] - result["delivered"]
    return result


def spread(values: list[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=450_000, help="full ticks the feeder publishes per run")
    parser.add_argument("--tokens", type=int, default=9000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each consumer")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"consumers to measure: {','.join(KINDS)}")
    parser.add_argument("--consume", nargs=4, help=argparse.SUPPRESS)  # PORT TOKENS TICKS KIND
    parser.add_argument("--feed", nargs=3, type=int, help=argparse.SUPPRESS)  # PORT TICKS TOKENS
    args = parser.parse_args()
    if args.feed:
        feed(*args.feed)
        return
    if args.consume:
        port, tokens, ticks, kind = args.consume
        if kind == "raw":
            consume_raw(int(port), int(tokens), int(ticks))
        else:
            asyncio.run(consume(int(port), int(tokens), int(ticks), kind))
        return

    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {','.join(sorted(unknown))}")
    server = LocalRedis(extra=("--client-output-buffer-limit", "pubsub 0 0 0"))
    server.start()
    try:
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
        print(f"# {measured_on()}; {platform.node()}: {os.cpu_count()} cpus, {platform.machine()}, "
              f"Python {platform.python_version()}, msgpack {msgpack.version}, {' '.join(version[:3])}; "
              f"load average {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
        print(f"# {args.ticks:,} full ticks per run over {args.tokens:,} tokens, published as fast as Redis "
              f"takes them; pub/sub output-buffer limit lifted (pubsub 0 0 0); {args.runs} runs each, "
              "figures min/median/max")  # fmt: skip
        print("# decode µs per full tick (823 bytes), best of 5: "
              + ", ".join(f"{name} {us:.2f}" for name, us in decode_us().items()))  # fmt: skip
        print(f"{'consumer':44} {'ticks/s delivered':>26} {'CPU µs/tick':>17} {'core':>5} "
              f"{'fed ticks/s':>11} {'lost':>5} {'missed':>6}")  # fmt: skip
        for kind in kinds:
            runs = [run_once(server, args, kind) for _ in range(args.runs)]
            rate, cpu = spread([r["rate"] for r in runs], ",.0f"), spread([r["cpu_us"] for r in runs], ".2f")
            core = statistics.median(r["core"] for r in runs)
            fed = statistics.median(r["feed_rate"] for r in runs)
            lost, missed = max(r["lost"] for r in runs), max(r["missed"] for r in runs)
            print(f"{KINDS[kind]:44} {rate:>26} {cpu:>17} {core:>5.0%} {fed:>11,.0f} {lost:>5,} {missed:>6,}",
                  flush=True)  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
