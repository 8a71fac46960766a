"""End to end at line rate: a Kite-protocol feed -> publisher -> real Redis -> a consumer.

    .venv/bin/python bench/publisher.py [--ticks 300000] [--modes full,quote,ltp]
                                        [--feeds prebuilt,built] [--rates 5000,20000,50000]
                                        [--repeat 3] [--skip-null] [--skip-latency] [--cluster]

Every part is a process of its own: the feed (the simulator), the publisher, a private
redis-server, and a consumer that PSUBSCRIBEs ``{ns}:ticks:*``. Printed, all from the same run:

* the bus limit: ``redis-benchmark`` PUBLISHing payloads of the same size with the same
  consumer attached (what Redis and one consumer carry on this machine);
* per mode, feed and burst shape (connection after connection, and all three at once),
  the rate at the consumer for kitebus and for a null publisher (the same sockets and
  asyncio plumbing writing a prebuilt RESP chunk per frame, no per-tick work: the ceiling
  of any design with this plumbing), kitebus as a fraction of each, loss counted at the
  consumer and split by where it happened, publisher CPU per 10k ticks (median and
  min-max of the bursts) and kitebus's over the null's, Redis's CPU per 10k ticks and its
  microseconds per PUBLISH and per HSET (``INFO commandstats``), and how busy the machine
  was (every process's CPU over the burst's wall time, of all cores). Two feeds:
  ``prebuilt`` writes frames prepared up front (the consumer sets the pace; CPU is left
  over), ``built`` builds every packet as it sends it (CPU-bound: feed, publisher, Redis
  and consumer share the cores, so the publisher's CPU per tick is the rate);
* latency from the feed's send to the consumer's receive at steady rates (p50, p99,
  p99.9, max), for kitebus and for the null publisher carrying each frame's send stamp
  (the probe), and for kitebus the part after the publisher read the tick;
* the publisher's peak RSS.

The private Redis runs with ``client-output-buffer-limit pubsub 0 0 0``: one consumer of
every channel can fall 32 MB behind on 2 cores and would be cut by Redis's default limit;
lifted, the publisher is what is measured.

``--cluster`` runs the same against a private 3-master Redis Cluster on loopback
(``KITEBUS_REDIS_CLUSTER=1``): ticks go out with SPUBLISH, the consumer SSUBSCRIBEs every
channel at its master, and the bus limit is three ``redis-benchmark`` runs at once, each
SPUBLISHing to a channel its own node serves (every node's limit lifted too). The null
publisher is left out there: its prebuilt chunks ignore which node serves which token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis
import msgpack
import redis as sync_redis
import redis.asyncio as redis
from redis.crc import key_slot

from bench.stack import cpu_seconds, measured_on
from config import Keys
from consumers.control import ControlClient
from kitebus.localredis import LocalCluster, LocalRedis
from kitewire import codec
from kitewire.encoder import SPEEDUPS, frame_encoder
from rediswire import bus, resp

NS = "bench"
FEEDS = {"prebuilt": "flood", "built": "built"}  # the feed's name -> its command to the feed process
HERE = os.path.abspath(__file__)
OI_OFFSET = 48  # the full packet's oi field carries the feed's send time (us, mod 2**32)
OI_KEY = msgpack.packb("oi") + b"\xce"  # in the payload: the key, then a uint32
OI_MARK = OI_KEY + b"\xfe\xed\xfa\xce"  # the latency probe's payloads: its stamp goes here
RECEIVED_KEY = msgpack.packb("received_at_ns") + b"\xcf"  # then the publisher's read time, a uint64


# --- the feed process ------------------------------------------------------------------------


async def feed_main() -> None:
    """The simulator in a process of its own, driven by lines on stdin."""
    from simulator.server import TickerServer

    async with TickerServer(rate=0.01, max_rate=1, heartbeat_interval=1.0) as server:
        print(server.url, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            command, args = line[0], line[1:]
            if command == "wait":  # wait MODE N: until N tokens are subscribed in MODE
                while sum(m == args[0] for s in server.sessions for m in s.modes.values()) < int(args[1]):
                    await asyncio.sleep(0.05)
                reply = f"{len(server.sessions)}"
            elif command in ("flood", "built"):  # flood|built TICKS_PER_CONNECTION sequential|interleaved
                started = time.perf_counter()
                flood = server.flood_line_rate if command == "flood" else server.flood_built
                sent = await flood(int(args[0]), sequential=args[1] == "sequential")
                reply = f"{sent} {time.perf_counter() - started:.3f}"
            elif command == "steady":  # steady RATE SECONDS (full mode): send time in oi
                reply = str(await steady(server, int(args[0]), float(args[1])))
            else:
                reply = "?"
            print(reply, flush=True)


async def steady(server, rate: int, seconds: float) -> int:
    """``rate`` ticks/s over every connection, every 10 ms, each packet stamped at send."""
    sessions = [s for s in server.sessions if s.modes]
    now = int(time.time())
    pools = [[bytearray(codec.encode_packet(server.market.tick(t, m, now))) for t, m in s.modes.items()]
             for s in sessions]  # fmt: skip
    per_step = max(1, rate // 100 // len(sessions))
    sent, turn = 0, 0
    step_at = time.perf_counter()
    deadline = step_at + seconds
    while step_at < deadline:
        for session, pool in zip(sessions, pools, strict=True):
            packets = [pool[(turn + i) % len(pool)] for i in range(per_step)]
            stamp = int(time.time() * 1e6) & 0xFFFFFFFF
            for packet in packets:
                struct.pack_into(">I", packet, OI_OFFSET, stamp)
            await session.websocket.send(codec.encode_frame(bytes(p) for p in packets))
            sent += per_step
        turn += per_step
        step_at += 0.01
        await asyncio.sleep(max(0.0, step_at - time.perf_counter()))
    return sent


# --- the null publisher ------------------------------------------------------------------------


class NullEncoder:
    """Prebuilt RESP per frame: as many PUBLISHes and HSET fields as the frame has packets,
    on the benchmark's own channels and fields in turn, each with the publisher's payload
    (so Redis does the same work as for kitebus), and no per-tick work.

    ``stamped`` (the latency probe, full mode): each frame's chunk carries the send time the
    feed stamped into its first packet's oi, in every payload (one ``bytes.replace`` a
    frame: C speed, no Python per tick)."""

    def __init__(self, payload: bytes, tokens: int, stamped: bool = False) -> None:
        self._payload = payload
        self._tokens = tokens
        self._next = 0
        self._chunks: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        self._stamped = stamped

    def encode(
        self, frame: bytes, received_at_ns: int, latest: dict[int, bytes]
    ) -> tuple[bytes, bytes, int, int]:
        count = int.from_bytes(frame[:2], "big") if len(frame) > 4 else 0
        start, self._next = self._next, (self._next + count) % self._tokens
        if self._stamped:  # steady frames of any size: one chunk per size, or the cache grows without end
            start = 0
        chunk = self._chunks.get((count, start))
        if chunk is None:
            keys = Keys(NS)
            tokens = [((start + i) % self._tokens + 1) << 8 | 1 for i in range(count)]
            command = bus.publish_command(bus.cluster_from_env())
            publishes = b"".join(resp.command(command, keys.ticks(t), self._payload) for t in tokens)
            fields = b"".join(resp.bulk(b"%d" % t) + resp.bulk(self._payload) for t in tokens)
            chunk = self._chunks[(count, start)] = (publishes, fields)
        if self._stamped and count:
            stamp = OI_KEY + frame[4 + OI_OFFSET : 8 + OI_OFFSET]
            return chunk[0].replace(OI_MARK, stamp), chunk[1].replace(OI_MARK, stamp), count, 0
        return chunk[0], chunk[1], count, 0

    unclaimed = 0  # the benchmark's ticks are all published, claimed or not

    def set_claimed(self, claimed: object) -> None:
        pass

    def release(self, tokens: object) -> None:
        pass

    def tracked(self) -> int:
        return 0


def null_publisher_main(mode: str, tokens: int, stamped: bool) -> None:
    from config import load_settings
    from publisher.app import Publisher
    from publisher.memory import tune_memory
    from rediswire.tasks import wait_for_stop_signal

    async def run() -> None:
        encoder = NullEncoder(payload(mode, stamped), tokens, stamped)
        publisher = Publisher(load_settings(), encoder=encoder)
        await publisher.start()
        await wait_for_stop_signal()
        await publisher.stop()

    tune_memory()  # as the publisher's main does
    asyncio.run(run())


# --- the consumer process ------------------------------------------------------------------------


def consume(port: int, expected: int, idle: float, latency: bool, channels: list[str]) -> None:
    """Count messages (or measure latency from the oi stamp) until ``expected`` or ``idle`` s of
    quiet: PSUBSCRIBE every tick channel on one server; on a cluster (``channels`` given),
    SSUBSCRIBE each channel at the node that serves it."""
    if channels:
        owner = _cluster_owners(port)
        socks = {p: socket.create_connection(("127.0.0.1", p)) for p in set(owner)}
        for name in channels:
            socks[owner[key_slot(name.encode())]].sendall(resp.command("SSUBSCRIBE", name))
        confirmations = len(channels)
    else:
        socks = {port: socket.create_connection(("127.0.0.1", port))}
        socks[port].sendall(resp.command("PSUBSCRIBE", Keys(NS).ticks_pattern))
        confirmations = 1
    readers = {sock: hiredis.Reader() for sock in socks.values()}
    selector = selectors.DefaultSelector()
    for sock in socks.values():
        selector.register(sock, selectors.EVENT_READ)
    count, first, last = 0, 0.0, 0.0
    delays: list[int] = []
    afters: list[int] = []
    while count < expected:
        ready = selector.select(idle)
        if not ready:
            break
        now = int(time.time() * 1e6) & 0xFFFFFFFF
        before = count
        for key, _ in ready:
            data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            if not data:
                print("consumer: redis closed the connection", file=sys.stderr)
                expected = count
                break
            reader = readers[key.fileobj]  # type: ignore[index]
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if reply[0] in (b"pmessage", b"smessage"):
                    count += 1
                    if latency:  # the oi value follows its key; no full decode, so the consumer keeps up
                        payload = reply[-1]
                        at = payload.find(OI_KEY) + len(OI_KEY)
                        delay = (now - int.from_bytes(payload[at : at + 4], "big")) & 0xFFFFFFFF
                        if delay < 60_000_000:  # else a tick of the market's own, not stamped by the feed
                            delays.append(delay)
                            # and the part after the publisher read it (its received_at_ns)
                            at = payload.find(RECEIVED_KEY) + len(RECEIVED_KEY)
                            received = int.from_bytes(payload[at : at + 8], "big") // 1000 & 0xFFFFFFFF
                            after = (now - received) & 0xFFFFFFFF
                            if after <= delay:  # else a prebuilt payload's (the null publisher's)
                                afters.append(after)
                else:
                    confirmations -= 1
                    if confirmations == 0:
                        print("ready", flush=True)
        if count > before:
            last = time.perf_counter()
            first = first or last
    quantiles = _quantiles(delays)
    out = {
        "count": count, "window": last - first, "latency_ms": quantiles, "after_ms": _quantiles(afters),
        "cpu": time.process_time(),
    }  # fmt: skip
    print(json.dumps(out), flush=True)


# --- the driver --------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cluster_owners(port: int) -> list[int]:
    """slot -> port of the master that serves it, asked of the node on ``port``."""
    client = sync_redis.Redis(port=port)
    owner = [0] * bus.SLOTS
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        owner[start : end + 1] = [int(master[1])] * (end + 1 - start)
    client.close()
    return owner


class Run:
    def __init__(self, port: int, rds: bus.Client, channels: list[str] | None = None) -> None:
        """``channels``: on a cluster, the tick channels the consumer SSUBSCRIBEs."""
        self.port, self.rds, self.keys = port, rds, Keys(NS)
        self.channels_file = ""
        if channels:
            with tempfile.NamedTemporaryFile("w", prefix="kitebus-bench-", delete=False) as out:
                out.write("\n".join(channels))
            self.channels_file = out.name

    async def consumer(
        self, expected: int, latency: bool = False, channels_file: str | None = None
    ) -> asyncio.subprocess.Process:
        channels = channels_file if channels_file is not None else self.channels_file
        proc = await asyncio.create_subprocess_exec(
            sys.executable, HERE, "--consume", str(self.port), str(expected),
            *(["--latency"] if latency else []), *(["--channels-file", channels] if channels else []),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"ready"
        return proc

    async def result(self, proc: asyncio.subprocess.Process) -> dict:
        assert proc.stdout is not None
        out = json.loads(await proc.stdout.readline())
        await proc.wait()
        return out

    async def status(self) -> dict[str, int]:
        raw = await self.rds.hgetall(self.keys.status)
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        names = ("published", "dropped", "conflated", "malformed", "pauses")
        return {k: int(fields.get(k, 0)) for k in names}


async def ask(feed: asyncio.subprocess.Process, line: str) -> str:
    assert feed.stdin is not None and feed.stdout is not None
    feed.stdin.write(line.encode() + b"\n")
    await feed.stdin.drain()
    return (await feed.stdout.readline()).decode().strip()


async def bus_limit(run: Run, payload_size: int, cluster: LocalCluster | None) -> tuple[float, float]:
    """redis-benchmark PUBLISH/s and what the consumer counted, payloads of the publisher's size
    (redis-benchmark takes text only). On a cluster: one redis-benchmark per master at once,
    SPUBLISHing to a channel it serves."""
    n = 1_000_000
    if cluster is None:
        runs = [(run.port, ["PUBLISH", f"{NS}:ticks:__rand_int__"], n)]
        consumer = await run.consumer(n)
    else:
        owner = _cluster_owners(run.port)
        channels = {}
        token = 0
        while len(channels) < len(cluster.nodes):
            token += 1
            channels.setdefault(owner[key_slot(Keys(NS).ticks(token).encode())], Keys(NS).ticks(token))
        runs = [(port, ["SPUBLISH", name], n // len(channels)) for port, name in channels.items()]
        with tempfile.NamedTemporaryFile("w", prefix="kitebus-bench-", delete=False) as out:
            out.write("\n".join(channels.values()))
        consumer = await run.consumer(sum(r[2] for r in runs), channels_file=out.name)
    outs = await asyncio.gather(*(asyncio.to_thread(
        subprocess.run,
        ["redis-benchmark", "-p", str(port), "-P", "64", "-r", "9000", "-n", str(count), "-q",
         *command, "x" * payload_size],
        capture_output=True, text=True, check=True,
    ) for port, command, count in runs))  # fmt: skip
    got = await run.result(consumer)
    rates = [re.search(r"([\d.]+) requests per second", o.stdout.replace("\r", "\n")) for o in outs]
    return sum(float(m.group(1)) for m in rates if m), got["count"] / max(got["window"], 1e-9)


async def burst(
    run: Run, feed: asyncio.subprocess.Process, pid: int, redis_pids: list[int], per_connection: int,
    shape: str, kind: str,
) -> dict:
    """One burst (``kind``: "flood" from prebuilt frames, "built" packet by packet), counted
    at the consumer; CPU of the publisher and of Redis (all nodes), and Redis's own time
    per command (INFO commandstats, reset before the burst)."""
    before = await run.status()
    consumer = await run.consumer(per_connection * 3)
    await run.rds.config_resetstat()
    cpu, redis_cpu, feed_cpu = cpu_seconds(pid), sum(map(cpu_seconds, redis_pids)), cpu_seconds(feed.pid)
    consumer_cpu = cpu_seconds(consumer.pid)
    started = time.perf_counter()
    sent = int(float((await ask(feed, f"{kind} {per_connection} {shape}")).split()[0]))
    feed_cpu = cpu_seconds(feed.pid) - feed_cpu
    got = await run.result(consumer)
    wall = time.perf_counter() - started
    cpu, redis_cpu = cpu_seconds(pid) - cpu, sum(map(cpu_seconds, redis_pids)) - redis_cpu
    # how busy the machine was: every process's CPU over the burst's length, of all cores
    everyone = cpu + redis_cpu + feed_cpu + got["cpu"] - consumer_cpu
    busy = everyone / wall / (os.cpu_count() or 1)
    usec = await command_usec(run.rds)
    await asyncio.sleep(1.2)  # one status write, so the counters are current
    after = await run.status()
    return {
        "sent": sent, "received": got["count"], "cpu": cpu, "redis_cpu": redis_cpu,
        "rate": got["count"] / max(got["window"], 1e-9), "busy": busy, **usec,
        **{k: after[k] - before[k] for k in after},
    }  # fmt: skip


async def command_usec(rds: bus.Client) -> dict[str, float]:
    """Redis's microseconds inside PUBLISH (or SPUBLISH) and HSET since the last reset,
    summed over the nodes: ``usec`` of INFO commandstats."""
    stats = await rds.info("commandstats")
    # a cluster client answers for each node
    nodes = [stats] if any(k.startswith("cmdstat_") for k in stats) else list(stats.values())
    out = {"publish_usec": 0.0, "publish_calls": 0, "hset_usec": 0.0, "hset_calls": 0}
    for node in nodes:
        for name, figures in node.items():
            if name in ("cmdstat_publish", "cmdstat_spublish"):
                out["publish_usec"] += float(figures["usec"])
                out["publish_calls"] += int(figures["calls"])
            elif name == "cmdstat_hset":
                out["hset_usec"] += float(figures["usec"])
                out["hset_calls"] += int(figures["calls"])
    return out


async def start_publisher(
    kind: str, env: dict[str, str], mode: str, tokens: int, stamped: bool = False
) -> asyncio.subprocess.Process:
    null = [HERE, "--null-publisher", mode, "--tokens", str(tokens), *(["--stamped"] if stamped else [])]
    args = ["-m", "publisher"] if kind == "kitebus" else null
    return await asyncio.create_subprocess_exec(sys.executable, *args, env=env)


async def stop(process: asyncio.subprocess.Process) -> None:
    """Stop a publisher (or the feed) and wait for it to end."""
    process.terminate()
    await process.wait()


async def bench(args: argparse.Namespace) -> None:
    tokens = [(n << 8) | 1 for n in range(1, args.tokens + 1)]
    cluster = LocalCluster(3) if args.cluster else None
    server = cluster or LocalRedis()
    server.start()
    nodes = cluster.nodes if cluster else [server]
    for node in nodes:
        client = redis.from_url(node.url)
        await client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        await client.aclose()
    redis_pids = [node.process.pid for node in nodes]  # type: ignore[union-attr]
    rds = bus.connect(server.url, args.cluster)
    channels = [Keys(NS).ticks(t) for t in tokens] if cluster else None
    run = Run(nodes[0].port, rds, channels)
    feed = await asyncio.create_subprocess_exec(
        sys.executable, HERE, "--feed", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert feed.stdout is not None
    url = (await feed.stdout.readline()).decode().strip()
    env = {
        **os.environ, "KITE_WS_URL": url, "REDIS_URL": server.url, "KITE_API_KEY": "kitebus",
        "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": NS, "KITEBUS_LOG_LEVEL": "WARNING",
        "KITEBUS_REDIS_CLUSTER": "1" if cluster else "0",
    }  # fmt: skip
    control = ControlClient(rds, NS)
    modes = args.modes.split(",")
    feeds = args.feeds.split(",")
    sizes = {m: len(payload(m)) for m in modes}
    per_connection = args.ticks // 3
    version = (await rds.info("server"))["redis_version"]
    if isinstance(version, dict):  # a cluster answers for each node
        version = next(iter(version.values()))
    where = "a private 3-master Redis Cluster, SPUBLISH/SSUBSCRIBE" if cluster else "a private Redis"
    print(f"# {measured_on()}; {platform.node()}: {os.cpu_count()} cpus, {platform.machine()}, "
          f"Python {platform.python_version()}, redis {version}; speedups={'C' if SPEEDUPS else 'off'}")
    print(f"# {args.tokens} tokens over 3 connections; bursts of {per_connection * 3:,} ticks "
          f"(500 packets a frame); {where}, the pub/sub output-buffer limit lifted")
    rows: dict[tuple[str, str, str, str], dict] = {}
    limits = {}
    publisher = None
    try:
        for mode in modes:
            limits[mode] = await bus_limit(run, sizes[mode], cluster)
        kinds = ["kitebus"] + ([] if args.skip_null or cluster else ["null"])
        rss = 0.0
        bursts: dict[tuple[str, str, str, str], list[dict]] = {}
        # kitebus and the null take turns, a round of one burst of each kind at a time, so
        # that a machine that slows down for a minute slows both down
        for mode in modes:
            for _ in range(args.repeat):
                for kind in kinds:
                    publisher = await start_publisher(kind, env, mode, args.tokens)
                    result = await control.subscribe(tokens, mode=mode, client="bench", timeout=60)
                    assert result.ok, result.error
                    assert (await control.set_mode(tokens, mode, client="bench", timeout=60)).ok
                    await asyncio.wait_for(ask(feed, f"wait {mode} {args.tokens}"), 60)
                    for feed_kind in feeds:
                        for shape in ("sequential", "interleaved"):
                            one = await burst(
                                run, feed, publisher.pid, redis_pids, per_connection, shape, FEEDS[feed_kind]
                            )
                            bursts.setdefault((mode, feed_kind, shape, kind), []).append(one)
                    if kind == "kitebus":
                        rss = max(rss, peak_rss_mb(publisher.pid))
                    await stop(publisher)
                    publisher = None
        for key, runs in sorted(bursts.items(), key=lambda item: kinds.index(item[0][3])):
            total = {k: sum(r[k] for r in runs) for k in runs[0] if k not in ("rate", "busy")}
            rows[key] = {
                **total, "rates": sorted(r["rate"] for r in runs),
                "cpus": sorted(r["cpu"] / max(r["received"], 1) * 1e7 for r in runs),
                "busy": statistics.median(r["busy"] for r in runs),
            }  # fmt: skip
        if not args.skip_latency and "full" in modes:
            for kind in kinds:  # null: the latency probe, the null publisher carrying each frame's stamp
                publisher = await start_publisher(kind, env, "full", args.tokens, stamped=kind == "null")
                await control.set_mode(tokens, "full", client="bench", timeout=60)
                await asyncio.wait_for(ask(feed, f"wait full {args.tokens}"), 60)
                for rate in map(int, args.rates.split(",")):
                    consumer = await run.consumer(10**9, latency=True)
                    await ask(feed, f"steady {rate} {args.seconds}")
                    rows[("latency", "", str(rate), kind)] = await run.result(consumer)
                await stop(publisher)
                publisher = None
        report(rows, limits, modes, rss)
    finally:
        for process in (publisher, feed):
            if process is not None and process.returncode is None:
                await stop(process)
        await rds.aclose()
        server.stop()


def report(rows: dict, limits: dict, modes: list[str], rss: float) -> None:
    print()
    print("bus limit (redis-benchmark -P 64 (S)PUBLISH, payloads of the same size, the same consumer):")
    for mode in modes:
        bench_rate, consumer_rate = limits[mode]
        print(f"  {mode:6} {bench_rate:>10,.0f} PUBLISH/s sent, {consumer_rate:>10,.0f}/s at the consumer")
    print()
    print("feed: prebuilt = frames written from memory (the consumer sets the pace, CPU is left over);")
    print("      built = every packet built from a fresh market tick as it is sent (CPU-bound: the")
    print("      feed, the publisher, Redis and the consumer share the cores)")
    print("cpu ms/10k: the publisher's CPU per 10k ticks received, median (min-max) of the bursts;")
    print("x null: kitebus's median over the null publisher's; redis us/call: inside PUBLISH, HSET")
    print()
    print(f"{'mode':6} {'feed':8} {'burst':12} {'publisher':9} {'sent':>9} {'received':>9} "
          f"{'ticks/s (median, min-max)':>27} {'of null':>7} {'of bus':>7} {'dropped':>7} "
          f"{'conflated':>9} {'after Redis':>11} {'cpu ms/10k':>18} {'x null':>6} {'redis ms/10k':>12} "
          f"{'redis us/call':>13} {'busy':>5}")  # fmt: skip
    for (mode, feed, shape, kind), r in rows.items():
        if mode == "latency":
            continue
        rates, cpus = r["rates"], r["cpus"]
        median = statistics.median(rates)
        null = rows.get((mode, feed, shape, "null"))
        of_null = cpu_x = ""
        if null and kind == "kitebus":
            of_null = f"{median / statistics.median(null['rates']):.2f}"
            cpu_x = f"{statistics.median(cpus) / statistics.median(null['cpus']):.2f}"
        of_bus = f"{median / limits[mode][1]:.2f}"
        after_redis = r["sent"] - r["received"] - r["dropped"] - r["conflated"]
        spread = f"{median:,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f})"
        cpu = f"{statistics.median(cpus):.1f} ({cpus[0]:.1f}-{cpus[-1]:.1f})"
        publish_us = r["publish_usec"] / max(r["publish_calls"], 1)
        per_call = f"{publish_us:.2f} {r['hset_usec'] / max(r['hset_calls'], 1):.0f}"
        redis_ms = r["redis_cpu"] / max(r["received"], 1) * 1e7
        print(f"{mode:6} {feed:8} {shape:12} {kind:9} {r['sent']:>9,} {r['received']:>9,} {spread:>27} "
              f"{of_null:>7} {of_bus:>7} {r['dropped']:>7,} {r['conflated']:>9,} {after_redis:>11,} "
              f"{cpu:>18} {cpu_x:>6} {redis_ms:>12.1f} {per_call:>13} {r['busy']:>5.0%}")  # fmt: skip
    latency = sorted((int(k[2]), k[3], r) for k, r in rows.items() if k[0] == "latency")
    if latency:
        print()
        print("latency, feed send -> consumer receive, full mode (ms); null = the null publisher")
        print("carrying each frame's send stamp (prebuilt RESP, one bytes.replace a frame):")
        for rate, kind, r in latency:
            if not r["count"]:
                print(f"  {rate:>7,} ticks/s {kind:8}: nothing received")
                continue
            p50, p99, p999, top = r["latency_ms"]
            print(f"  {rate:>7,} ticks/s {kind:8}: p50 {p50:.2f}  p99 {p99:.2f}  p99.9 {p999:.2f}"
                  f"  max {top:.2f}  ({r['count']:,} ticks)")  # fmt: skip
            if r.get("after_ms"):
                p50, p99, p999, top = r["after_ms"]
                print(f"  {'':>7}  of which publisher read -> consumer: p50 {p50:.2f}  p99 {p99:.2f}"
                      f"  p99.9 {p999:.2f}  max {top:.2f}")  # fmt: skip
    print()
    print(f"publisher peak RSS {rss:.0f} MB (over the bursts; the latency runs' publishers are not counted)")


def _quantiles(us: list[int]) -> list[float]:
    """p50, p99, p99.9 and max in ms ([] for no values)."""
    us.sort()
    return [_quantile(us, q) for q in (0.5, 0.99, 0.999, 1.0)] if us else []


def _quantile(sorted_us: list[int], q: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))] / 1000


def _packet(mode: str, oi: int | None = None) -> bytes:
    from simulator.market import Market

    tick = Market(0).tick(408065, mode, int(time.time()))
    if oi is not None:
        tick["oi"] = oi
    return codec.encode_packet(tick)


def payload(mode: str, stamped: bool = False) -> bytes:
    """A payload of ``mode`` as the publisher sends it, from its own encoder (``seq`` and
    ``epoch`` included): the null publisher sends it, the bus limit its size. ``stamped``:
    its oi is ``OI_MARK``'s value, for the latency probe to replace."""
    latest: dict[int, bytes] = {}
    epoch = time.time_ns() // 1_000_000  # as the publisher's (publisher/app.py)
    packet = _packet(mode, int.from_bytes(OI_MARK[-4:], "big") if stamped else None)
    frame_encoder(b"", epoch=epoch).encode(codec.encode_frame([packet]), time.time_ns(), latest)
    assert not stamped or latest[408065].count(OI_MARK) == 1
    return latest[408065]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=300_000, help="ticks per burst, over 3 connections")
    parser.add_argument("--tokens", type=int, default=9000)
    parser.add_argument("--modes", default="full,quote,ltp")
    parser.add_argument("--feeds", default="prebuilt,built", help="prebuilt frames, packets built as sent")
    parser.add_argument("--rates", default="5000,20000,50000", help="steady rates for the latency runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each latency run")
    parser.add_argument("--repeat", type=int, default=3, help="bursts of each kind (median reported)")
    parser.add_argument("--skip-null", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--cluster", action="store_true", help="a private 3-master Redis Cluster")
    parser.add_argument("--channels-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--consume", nargs=2, type=int, metavar=("PORT", "EXPECTED"), help=argparse.SUPPRESS)
    parser.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stamped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--feed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--null-publisher", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        channels = open(args.channels_file).read().split() if args.channels_file else []
        consume(args.consume[0], args.consume[1], idle=3.0, latency=args.latency, channels=channels)
    elif args.feed:
        asyncio.run(feed_main())
    elif args.null_publisher:
        null_publisher_main(args.null_publisher, args.tokens, args.stamped)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
