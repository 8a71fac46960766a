"""Many strategies at once: N strategy processes on the library, 9,000 tokens at Kite's pace, then a spike.

    .venv/bin/python bench/strategies.py [--strategies 50 | --strategies 10,25,50,100]
                                         [--seconds 60] [--spike-seconds 60] [--rate 1.5] [--spike 5]
                                         [--min-tokens 200] [--max-tokens 2000] [--seed 24] [--cluster]
                                         [--per-strategy] [--json FILE]

Every part is a process of its own: the feed (the simulator, speaking Kite's wire protocol,
sending full-mode packets of every subscribed token at ``--rate`` ticks/s each, in frames
every 10 ms per connection, each packet stamped with its send time in ``oi`` and its phase
in ``oi_day_high``), ``python -m publisher``, a private redis-server (or with ``--cluster`` a
private 3-master Redis Cluster), and N strategies, each a ``TickSubscriber`` that claims its
tokens through the control stream (200-2,000 of them, a seeded random choice, overlapping)
and takes every tick as a strategy's ``async for`` does. The bench itself claims all the
tokens first (as a recorder of the whole market would), so the feed is the same whatever N.

The feed runs ``--seconds`` at ``--rate``, then ``--spike-seconds`` at ``--spike`` times that
(the 09:15 open). Printed per N and phase: ticks each strategy received against what the
feed sent for its tokens (loss), latency from the feed's send to the strategy's receive
(p50 / p99 per strategy, min / median / max over strategies), and CPU as a share of one core
of Redis (every node), the publisher, the feed and the strategies, and how busy the machine
was. After a sweep: Redis CPU per published tick and per delivery (fitted over the runs),
how many strategies one Redis core carries, and what gave out first.

Redis keeps its default pub/sub output-buffer limit (32 MB): a strategy that falls that far
behind is cut off, reconnects and counts what it missed, as it would in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from array import array
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.stack import cpu_seconds, measured_on
from config import Keys
from kitewire import codec

NS = "bench"
HERE = os.path.abspath(__file__)
OI_OFFSET, PHASE_OFFSET = 48, 52  # the full packet's oi and oi_day_high fields
PACKET, SLOT = 184, 186  # a full packet of a tradable token, and with its length prefix
STEP = 0.01  # seconds between a connection's frames
QUIET = 1.5  # seconds without a stamped tick before a strategy reports
IDLE = 3.0  # seconds of the idle window before the feed starts
MASK = 0xFFFFFFFF


# --- the feed process ------------------------------------------------------------------------


async def feed_main() -> None:
    """The simulator in a process of its own, driven by lines on stdin."""
    from simulator.server import TickerServer

    # its own send loop all but off (a tick per connection per second): the feed below is the market
    async with TickerServer(rate=0.01, max_rate=1, heartbeat_interval=1.0) as server:
        print(server.url, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        pools: dict[int, tuple[list[int], bytearray]] = {}
        while line := (await reader.readline()).decode().split():
            if line[0] == "wait":  # wait N: until N tokens are subscribed in full mode
                while sum(m == "full" for s in server.sessions for m in s.modes.values()) < int(line[1]):
                    await asyncio.sleep(0.05)
                print(len(server.sessions), flush=True)
            elif line[0] == "run":  # run PHASE RATE SECONDS [PHASE RATE SECONDS ...]
                phases = []
                for i in range(1, len(line), 3):
                    phase, rate, seconds = int(line[i]), float(line[i + 1]), float(line[i + 2])
                    print(f"phase {phase}", flush=True)
                    phases.append(await pace(server, pools, phase, rate, seconds))
                print(json.dumps(phases), flush=True)


async def pace(server: Any, pools: dict[int, tuple[list[int], bytearray]], phase: int, rate: float,
               seconds: float) -> dict:  # fmt: skip
    """``rate`` full ticks/s for each subscribed token, every connection a frame every 10 ms,
    the tokens in turn; each packet stamped at send. Returns what was sent, per token."""
    sessions = [s for s in server.sessions if s.modes]
    now = int(time.time())
    for s in sessions:  # prebuilt once, length-prefixed as in a frame: the feed measures the bus
        if len(pools.get(s.id, ((),))[0]) != len(s.modes):
            packets = [codec.encode_packet(server.market.tick(t, "full", now)) for t in s.modes]
            assert {len(p) for p in packets} == {PACKET}
            wire = bytearray(b"".join(len(p).to_bytes(2, "big") + p for p in packets) * 2)  # twice: no wrap
            pools[s.id] = (list(s.modes), wire)
    for _, wire in pools.values():
        _stamp(wire, PHASE_OFFSET, phase, len(wire) // SLOT)
    owed = [0.0] * len(sessions)
    turns = [0] * len(sessions)
    for session in sessions:  # the simulator's own sends keep off the sockets meanwhile
        session.flooding = True
    try:
        started, sent = await _paced(sessions, pools, rate, seconds, owed, turns)
    finally:
        for session in sessions:
            session.flooding = False
    counts: dict[int, int] = {}
    for i, session in enumerate(sessions):
        tokens = pools[session.id][0]
        rounds, extra = divmod(turns[i], len(tokens))
        for k, token in enumerate(tokens):
            counts[token] = rounds + (k < extra)
    return {"sent": sent, "seconds": time.perf_counter() - started, "counts": counts}


async def _paced(sessions: list[Any], pools: dict[int, tuple[list[int], bytearray]], rate: float,
                 seconds: float, owed: list[float], turns: list[int]) -> tuple[float, int]:  # fmt: skip
    """The sending loop of ``pace``: frames written straight to the sockets, uncompressed, as
    the simulator's line-rate flood writes them (through ``websocket.send`` the per-message
    deflate that websockets negotiates by default would cost the feed half a core in the spike)."""
    started = step_at = time.perf_counter()
    deadline = started + seconds
    while step_at < deadline:
        for i, session in enumerate(sessions):
            tokens, wire = pools[session.id]
            owed[i] += rate * len(tokens) * STEP
            count = int(owed[i])
            if not count:
                continue
            owed[i] -= count
            at = turns[i] % len(tokens) * SLOT
            body = wire[at : at + count * SLOT]
            _stamp(body, OI_OFFSET, time.time_ns() // 1000 & MASK, count)
            session.websocket.transport.write(_binary_frame(count.to_bytes(2, "big") + body))
            await session.websocket.drain()
            turns[i] += count
        step_at += STEP
        await asyncio.sleep(max(0.0, step_at - time.perf_counter()))
    return started, sum(turns)


def _binary_frame(payload: bytes) -> bytes:
    """A server's unmasked, final, binary WebSocket frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 1 << 16:
        return bytes((0x82, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x82, 127)) + n.to_bytes(8, "big") + payload


def _stamp(wire: bytearray, offset: int, value: int, count: int) -> None:
    """Write the uint32 ``value`` at ``offset`` of each of ``count`` length-prefixed packets,
    a byte at a time over all of them (one slice each, not a call per packet)."""
    for k, byte in enumerate(value.to_bytes(4, "big")):
        wire[2 + offset + k : count * SLOT : SLOT] = bytes((byte,)) * count


# --- a strategy process ------------------------------------------------------------------------


async def strategy_main(url: str, cluster: bool, name: str) -> None:
    """One strategy: claims its tokens through the library, takes every tick, and on
    ``report`` (once quiet) prints per phase what it received and the latencies."""
    from consumers.subscriber import TickSubscriber

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # the spec through the same reader: a buffered sys.stdin would read ahead and keep the
    # driver's next command from it
    spec = json.loads(await reader.readline())
    os.nice(spec["nice"])
    delays: dict[int, array[int]] = {phase: array("I") for phase in spec["phases"]}
    async with TickSubscriber(url, client=name, namespace=NS, cluster=cluster) as sub:
        await sub.subscribe(spec["tokens"], mode="full")
        print("ready", flush=True)
        command = asyncio.ensure_future(reader.readline())
        report_at = 0.0
        last = time.monotonic()
        while True:
            got = False
            for tick in await sub.batch(limit=1000, wait=0.2):
                kept = delays.get(tick.get("oi_day_high", 0))
                if kept is not None and tick["oi"]:  # else a tick of the simulator's own or a snapshot
                    kept.append((time.time_ns() // 1000 - tick["oi"]) & MASK)
                    got = True
            if got:
                last = time.monotonic()
            if command.done():
                if command.result().strip() != b"report":
                    break
                report_at, command = time.monotonic(), asyncio.ensure_future(reader.readline())
            if report_at and time.monotonic() - max(last, report_at) >= QUIET:
                report_at = 0.0
                phases = {str(p): _latency(d) for p, d in delays.items()}
                print(json.dumps({"phases": phases, "missed": sub.missed, "reconnects": sub.reconnects}),
                      flush=True)  # fmt: skip
        command.cancel()


def _latency(delays: array[int]) -> dict:
    ordered = sorted(delays)
    if not ordered:
        return {"count": 0}
    at = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 for q in (0.5, 0.99, 1.0)]
    return {"count": len(ordered), "p50": at[0], "p99": at[1], "max": at[2]}


# --- the driver ----------------------------------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


class Sample:
    """CPU seconds of each process watched, and of the machine, at one moment."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.at = time.perf_counter()
        self.cpu = {name: [cpu_seconds(pid) for pid in pids] for name, pids in groups.items()}
        self.machine = machine_busy()

    def since(self, before: Sample) -> dict:
        wall = self.at - before.at
        shares = {name: [(a - b) / wall for a, b in zip(now, before.cpu[name], strict=True)]
                  for name, now in self.cpu.items()}  # fmt: skip
        busy = (self.machine[0] - before.machine[0]) / max(1, self.machine[1] - before.machine[1])
        return {"wall": wall, "cores": shares, "machine_busy": busy}


async def ask(proc: asyncio.subprocess.Process, line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line.encode() + b"\n")
    await proc.stdin.drain()
    return (await proc.stdout.readline()).decode().strip()


async def start_strategies(
    sets: list[list[int]], phases: list[int], url: str, cluster: bool, nice: int
) -> list[asyncio.subprocess.Process]:
    procs = []
    for index, tokens in enumerate(sets):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, HERE, "--strategy", f"strategy-{index:03d}", "--url", url,
            *(["--cluster"] if cluster else []),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"tokens": tokens, "phases": phases, "nice": nice}).encode() + b"\n")
    return procs


async def wait_ready(procs: list[asyncio.subprocess.Process], timeout: float) -> None:
    async def one(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"a strategy did not start (pid {proc.pid}, exit {proc.returncode})")

    await asyncio.wait_for(asyncio.gather(*(one(p) for p in procs)), timeout)


async def stop_all(procs: list[asyncio.subprocess.Process], grace: float = 30.0) -> None:
    """``exit`` (each releases its claims), then SIGTERM, then SIGKILL for any still running."""
    for proc in procs:
        if proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(b"exit\n")
    for signal_sent in ("exit", "terminate", "kill"):
        running = [p for p in procs if p.returncode is None]
        if not running:
            return
        if signal_sent != "exit":
            for proc in running:
                getattr(proc, signal_sent)()
        await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=grace)


async def publisher_status(rds: Any) -> dict[str, int]:
    raw = await rds.hgetall(Keys(NS).status)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    return {k: int(fields.get(k, 0)) for k in ("published", "dropped", "conflated")}


async def status_after(rds: Any, since: float, timeout: float = 10.0) -> dict[str, int]:
    """The publisher's counters from a status write later than ``since`` (it writes one about
    once a second), so that they include every tick up to then."""
    deadline = time.monotonic() + timeout
    while True:
        written = await rds.hget(Keys(NS).status, "heartbeat_at")
        if written is not None and float(written) > since:
            return await publisher_status(rds)
        if time.monotonic() > deadline:
            raise RuntimeError("the publisher wrote no status for 10 s")
        await asyncio.sleep(0.05)


async def run_once(
    args: argparse.Namespace, index: int, sets: list[list[int]], stack: dict, groups: dict[str, list[int]]
) -> dict:
    """One N: start the strategies, feed the steady phase and the spike, collect the reports."""
    phases = [2 * index + 1, 2 * index + 2]  # tags of this run's ticks: a snapshot of an earlier one is not
    started = time.perf_counter()
    procs = await start_strategies(sets, phases, stack["url"], args.cluster, args.nice)
    try:
        await wait_ready(procs, timeout=600)
        ready_s = time.perf_counter() - started
        watched = {**groups, "strategies": [p.pid for p in procs]}
        quiet = Sample(watched)
        await asyncio.sleep(IDLE)  # a window measured: what each costs with no market ticking
        samples = [Sample(watched)]
        before = await publisher_status(stack["rds"])
        feed = stack["feed"]
        feed.stdin.write(f"run {phases[0]} {args.rate} {args.seconds} "
                         f"{phases[1]} {args.rate * args.spike} {args.spike_seconds}\n".encode())  # fmt: skip
        await feed.stdin.drain()
        for _ in phases:
            assert (await feed.stdout.readline()).startswith(b"phase ")
            samples.append(Sample(watched))
        sent = json.loads(await feed.stdout.readline())
        samples.append(Sample(watched))
        reports = await asyncio.gather(*(ask(p, "report") for p in procs))
        samples.append(Sample(watched))
        after = await status_after(stack["rds"], time.time())
    finally:
        await stop_all(procs)
    windows = [samples[i + 1].since(samples[i]) for i in range(1, 4)] + [samples[0].since(quiet)]
    return summarize(args, sets, phases, sent, [json.loads(r) for r in reports], windows,
                     {k: after[k] - before[k] for k in after}, ready_s)  # fmt: skip


def summarize(
    args: argparse.Namespace, sets: list[list[int]], phases: list[int], sent: list[dict], reports: list[dict],
    windows: list[dict], status: dict[str, int], ready_s: float,
) -> dict:  # fmt: skip
    rows = []
    for k, (name, target) in enumerate((("steady", args.rate), ("spike", args.rate * args.spike))):
        counts = {int(t): n for t, n in sent[k]["counts"].items()}
        per = []
        cores = windows[k]["cores"]
        idle = {name: sum(shares) for name, shares in windows[3]["cores"].items()}
        for tokens, report, cpu in zip(sets, reports, cores["strategies"], strict=True):
            got = report["phases"][str(phases[k])]
            per.append({**got, "expected": sum(counts.get(t, 0) for t in tokens), "tokens": len(tokens),
                        "cpu": cpu, "reconnects": report["reconnects"],
                        "missed": report["missed"]})  # fmt: skip
        rows.append({
            "phase": name, "target_rate": target * len(counts),
            "feed_rate": sent[k]["sent"] / sent[k]["seconds"],
            "sent": sent[k]["sent"], "seconds": sent[k]["seconds"], "per_strategy": per,
            "expected": sum(p["expected"] for p in per), "received": sum(p["count"] for p in per),
            "redis": sum(cores["redis"]), "redis_nodes": cores["redis"], "publisher": cores["publisher"][0],
            "feed": cores["feed"][0], "strategies": sum(cores["strategies"]),
            "machine_busy": windows[k]["machine_busy"], "idle": idle,
        })  # fmt: skip
    drain = windows[2]
    return {
        "strategies": len(sets), "ready_s": ready_s, "phases": rows, "publisher_status": status,
        "drain": {"seconds": drain["wall"], "strategies": sum(drain["cores"]["strategies"]),
                  "redis": sum(drain["cores"]["redis"]), "machine_busy": drain["machine_busy"]},
        "reconnects": sum(r["reconnects"] for r in reports), "missed": sum(r["missed"] for r in reports),
    }  # fmt: skip


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def report_run(run: dict, per_strategy: bool) -> None:
    sizes = [p["tokens"] for p in run["phases"][0]["per_strategy"]]
    print(f"\n{run['strategies']} strategies, {min(sizes):,}-{max(sizes):,} tokens each "
          f"(median {statistics.median(sizes):,.0f}, {sum(sizes):,} claims); all ready "
          f"{run['ready_s']:.1f} s after start")  # fmt: skip
    print(f"{'phase':7} {'feed ticks/s':>13} {'deliveries/s':>12} {'received':>11} {'expected':>11} "
          f"{'lost':>8} {'whole':>5} {'p50 ms min/med/max':>19} {'p99 ms min/med/max':>20} "
          f"{'redis':>6} {'pub':>5} {'feed':>5} {'strats':>6} {'per strat %':>14} {'other':>5} "
          f"{'busy':>5}")  # fmt: skip
    for row in run["phases"]:
        per = row["per_strategy"]
        whole = sum(p["count"] >= p["expected"] for p in per)
        p50 = [p["p50"] for p in per if p["count"]]
        p99 = [p["p99"] for p in per if p["count"]]
        shares = [100 * p["cpu"] for p in per]
        print(f"{row['phase']:7} {row['feed_rate']:>13,.0f} {row['expected'] / row['seconds']:>12,.0f} "
              f"{row['received']:>11,} {row['expected']:>11,} {row['expected'] - row['received']:>8,} "
              f"{whole:>2}/{len(per):<2} {_spread(p50):>19} {_spread(p99):>20} "
              f"{100 * row['redis']:>5.0f}% {100 * row['publisher']:>4.0f}% {100 * row['feed']:>4.0f}% "
              f"{100 * row['strategies']:>5.0f}% {_spread(shares, '{:.0f}'):>14} "
              f"{100 * _other(row):>4.0f}% {100 * row['machine_busy']:>4.0f}%")  # fmt: skip
    drain = run["drain"]
    status = run["publisher_status"]
    idle = run["phases"][0]["idle"]
    print(f"idle ({IDLE:g} s before the feed): redis {100 * idle['redis']:.1f}%, publisher "
          f"{100 * idle['publisher']:.1f}%, strategies {100 * idle['strategies']:.1f}% of a core")
    print(f"after the feed: {drain['seconds']:.1f} s until every strategy was quiet for {QUIET} s "
          f"(strategies {100 * drain['strategies']:.0f}%, redis {100 * drain['redis']:.0f}% of a core); "
          f"reconnects {run['reconnects']}, seq gaps {run['missed']:,}; publisher dropped "
          f"{status['dropped']:,}, conflated {status['conflated']:,}")  # fmt: skip
    for row in run["phases"]:
        nodes = row["redis_nodes"]
        if len(nodes) > 1:
            print(f"  {row['phase']}: redis per node " + ", ".join(f"{100 * c:.0f}%" for c in nodes))
        print(f"  {row['phase']}: CPU per tick, beyond the idle rate: redis "
              f"{_us(_net(row, 'redis'), row, 'expected')} per delivery, "
              f"{_us(_net(row, 'redis'), row, 'sent')} per published tick; strategies "
              f"{_us(_net(row, 'strategies'), row, 'received')} per tick received; publisher "
              f"{_us(_net(row, 'publisher'), row, 'sent')} per tick")  # fmt: skip
    if per_strategy:
        heads = [f"{row['phase'] + ' received/expected p50 p99 max cpu':>50}" for row in run["phases"]]
        print(f"  {'strategy':>8} {'tokens':>6} " + " ".join(heads))
        for i in range(run["strategies"]):
            cells = []
            for row in run["phases"]:
                p = row["per_strategy"][i]
                lat = f"{p['p50']:.1f} {p['p99']:.1f} {p['max']:.1f}" if p["count"] else "-"
                cells.append(f"{p['count']:>10,}/{p['expected']:<10,} {lat:>17} {100 * p['cpu']:>4.0f}%")
            print(f"  {i:>8} {run['phases'][0]['per_strategy'][i]['tokens']:>6} " + " ".join(cells))


def _us(cores: float, row: dict, per: str) -> str:
    return f"{1e6 * cores * row['seconds'] / max(row[per], 1):.2f} us"


def _other(row: dict) -> float:
    """Cores the machine spent beyond the benchmark's processes: the driver, other users."""
    ours = row["redis"] + row["publisher"] + row["feed"] + row["strategies"]
    return max(0.0, row["machine_busy"] * (os.cpu_count() or 1) - ours)


def _net(row: dict, name: str) -> float:
    """Cores used by ``name`` in the phase beyond its idle rate (heartbeats, status writes, cron)."""
    return max(0.0, row[name] - row["idle"][name])


def _whole(row: dict) -> bool:
    """Every strategy got every tick of the phase (Redis did the whole fan-out)."""
    return all(p["count"] >= p["expected"] for p in row["per_strategy"])


def fit_redis(runs: list[dict]) -> tuple[float, float] | None:
    """Redis CPU = a x published ticks + b x deliveries, least squares over every phase in
    which no tick was lost (seconds per tick); None when those cannot tell the two apart."""
    rows = [row for run in runs for row in run["phases"] if _whole(row)]
    if not rows:
        return None
    points = [(r["sent"], r["expected"], _net(r, "redis") * r["seconds"]) for r in rows]
    spp = sum(p * p for p, _, _ in points)
    sdd = sum(d * d for _, d, _ in points)
    spd = sum(p * d for p, d, _ in points)
    spc = sum(p * c for p, _, c in points)
    sdc = sum(d * c for _, d, c in points)
    det = spp * sdd - spd * spd
    if max(d / max(p, 1) for p, d, _ in points) < 1.2 * min(d / max(p, 1) for p, d, _ in points) or det <= 0:
        return None
    per_tick, per_delivery = (spc * sdd - sdc * spd) / det, (spp * sdc - spd * spc) / det
    return (per_tick, per_delivery) if per_tick > 0 and per_delivery > 0 else None  # else noise


def report_sweep(runs: list[dict], args: argparse.Namespace) -> None:
    print("\nsweep (per phase: the feed's rate of its target, lost ticks, strategies short, median-strategy "
          "p99 ms, cores of redis / publisher / strategies, machine busy):")  # fmt: skip
    gave_out = ""
    for run in runs:
        cells = []
        for row in run["phases"]:
            per = row["per_strategy"]
            short = sum(p["count"] < p["expected"] for p in per)
            p99 = statistics.median([p["p99"] for p in per if p["count"]] or [0.0])
            lost = row["expected"] - row["received"]
            cells.append(f"{row['phase']}: fed {row['feed_rate'] / row['target_rate']:.2f} lost {lost:,} "
                         f"short {short} p99 {p99:.0f} "
                         f"cores {row['redis']:.2f}/{row['publisher']:.2f}/{row['strategies']:.2f} "
                         f"busy {100 * row['machine_busy']:.0f}%")  # fmt: skip
            if not gave_out and (lost > 0 or p99 > args.p99_limit):
                gave_out = f"{run['strategies']} strategies, {row['phase']}: " + _limit(row, lost, p99)
        print(f"  {run['strategies']:>4}  " + "   ".join(cells))
    print(f"first to give out: {gave_out or f'nothing (no loss, median p99 under {args.p99_limit:g} ms)'}")
    fit = fit_redis(runs)
    tokens = args.tokens
    if fit is None:
        row = max((r for run in runs for r in run["phases"]), key=lambda r: (_whole(r), r["expected"]))
        per_delivery, per_tick = _net(row, "redis") * row["seconds"] / max(row["expected"], 1), 0.0
        print(f"redis CPU per delivery {1e6 * per_delivery:.2f} us ({row['phase']} of "
              f"{len(row['per_strategy'])} strategies, the publish cost folded in: no fit)")
    else:
        per_tick, per_delivery = fit
        whole = sum(_whole(r) for run in runs for r in run["phases"])
        print(f"redis CPU, fitted over the {whole} phases with no tick lost: "
              f"{1e6 * per_tick:.2f} us per published tick (PUBLISH + HSET) + "
              f"{1e6 * per_delivery:.2f} us per delivery to a subscriber")  # fmt: skip
    print(f"\nstrategies one Redis core carries ({tokens:,} tokens published; "
          f"{args.rate:g} ticks/s steady, {args.rate * args.spike:g} in the spike):")  # fmt: skip
    print(f"  {'tokens/strategy':>15} {'steady':>8} {'spike':>8}")
    for size in (200, 500, 1000, 2000):
        cells = []
        for rate in (args.rate, args.rate * args.spike):
            room = 1 - per_tick * tokens * rate
            cells.append(f"{room / (per_delivery * size * rate):>8,.0f}" if room > 0 and per_delivery > 0 else
                         f"{'-':>8}")  # fmt: skip
        print(f"  {size:>15,} " + " ".join(cells))


def _limit(row: dict, lost: int, p99: float) -> str:
    """Which resource was short when a phase lost ticks or ran late: a single-threaded
    process at a full core, else the machine's CPUs (and who used them), else the feed."""
    what = f"lost {lost:,}" if lost > 0 else f"p99 {p99:.0f} ms"
    uses = (f"strategies {row['strategies']:.2f} cores, Redis {row['redis']:.2f}, publisher "
            f"{row['publisher']:.2f}, feed {row['feed']:.2f}, other {_other(row):.2f}")  # fmt: skip
    if max(row["redis_nodes"]) > 0.9:
        return f"{what}; Redis at {100 * max(row['redis_nodes']):.0f}% of a core ({uses})"
    if row["publisher"] > 0.9:
        return f"{what}; the publisher at {100 * row['publisher']:.0f}% of a core ({uses})"
    if row["machine_busy"] > 0.9:
        return f"{what}; the machine's {os.cpu_count()} CPUs {100 * row['machine_busy']:.0f}% busy ({uses})"
    if row["feed_rate"] < 0.95 * row["target_rate"]:
        rate = f"{row['feed_rate']:,.0f} of {row['target_rate']:,.0f}/s"
        return f"{what}; the feed fell behind ({rate}; {uses})"
    return f"{what}; no CPU saturated ({uses})"


async def bench(args: argparse.Namespace) -> None:
    import redis.asyncio as redis

    from consumers.control import ControlClient
    from kitebus.localredis import LocalCluster, LocalRedis
    from kitebus.localredis import _die_with_parent as die_with_parent
    from kitewire.encoder import SPEEDUPS
    from rediswire import bus

    counts = [int(n) for n in args.strategies.split(",")]
    universe = [(n << 8) | 1 for n in range(1, args.tokens + 1)]
    rng = random.Random(args.seed)  # strategy i holds the same tokens whatever N
    sets = [sorted(rng.sample(universe, rng.randint(args.min_tokens, min(args.max_tokens, args.tokens))))
            for _ in range(max(counts))]  # fmt: skip
    cluster = LocalCluster(3) if args.cluster else None
    server = cluster or LocalRedis()
    server.start()
    nodes = cluster.nodes if cluster else [server]
    feed = publisher = None
    rds = bus.connect(server.url, args.cluster)
    control = ControlClient(rds, NS)
    try:
        feed = await asyncio.create_subprocess_exec(
            sys.executable, HERE, "--feed", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # the per-token counts come back on one line
        )  # fmt: skip
        assert feed.stdout is not None
        ws_url = (await feed.stdout.readline()).decode().strip()
        env = {
            **os.environ, "KITE_WS_URL": ws_url, "REDIS_URL": server.url, "KITE_API_KEY": "kitebus",
            "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": NS, "KITEBUS_LOG_LEVEL": "WARNING",
            "KITEBUS_REDIS_CLUSTER": "1" if cluster else "0",
        }  # fmt: skip
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "publisher", env=env, preexec_fn=die_with_parent  # even on SIGKILL
        )
        result = await control.subscribe(universe, mode="full", client="bench-universe", timeout=120)
        assert result.ok, result.error
        await asyncio.wait_for(ask(feed, f"wait {len(universe)}"), 120)
        client = redis.from_url(nodes[0].url)
        version = (await client.info("server"))["redis_version"]
        await client.aclose()
        where = "a private 3-master Redis Cluster (SPUBLISH/SSUBSCRIBE)" if cluster else "a private Redis"
        print(f"# {measured_on()}; {platform.node()}: {os.cpu_count()} cpus, {platform.machine()}, "
              f"Python {platform.python_version()}, redis {version}; speedups={'C' if SPEEDUPS else 'off'}; "
              f"load average {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
        print(f"# {len(universe):,} tokens in full mode over 3 connections, {args.rate:g} ticks/s each for "
              f"{args.seconds:g} s, then {args.spike:g}x for {args.spike_seconds:g} s; {where}, "
              f"default output-buffer limits; seed {args.seed}; strategies at nice {args.nice}")  # fmt: skip
        print("# cores: share of one CPU (redis: every node; strats: all strategies together; other: "
              "the rest of the machine, this driver and other users); busy: all CPUs of the machine")
        groups = {"redis": [n.process.pid for n in nodes],  # type: ignore[union-attr]
                  "publisher": [publisher.pid], "feed": [feed.pid]}  # fmt: skip
        runs = []
        for index, n in enumerate(counts):
            runs.append(await run_once(args, index, sets[:n], {"url": server.url, "rds": rds, "feed": feed},
                                       groups))  # fmt: skip
            report_run(runs[-1], args.per_strategy)
        report_sweep(runs, args)
        if args.json:
            with open(args.json, "w") as out:  # noqa: ASYNC230 (once, at the end)
                json.dump({"args": vars(args), "runs": runs}, out)
    finally:
        await control.aclose()
        await rds.aclose()
        for proc in (publisher, feed):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="50", help="how many strategy processes; a list sweeps")
    parser.add_argument("--tokens", type=int, default=9000, help="tokens ticking (at most 9000)")
    parser.add_argument("--min-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1.5, help="ticks/s per token in the steady phase")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the steady phase")
    parser.add_argument("--spike", type=float, default=5.0, help="the spike's rate, times --rate")
    parser.add_argument("--spike-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--p99-limit", type=float, default=100.0, help="ms: a median p99 above it gave out")
    parser.add_argument("--cluster", action="store_true", help="a private 3-master Redis Cluster")
    parser.add_argument("--nice", type=int, default=0, help="the strategies' niceness (the bus first)")
    parser.add_argument("--per-strategy", action="store_true", help="a line per strategy too")
    parser.add_argument("--json", default="", help="write every figure to this file")
    parser.add_argument("--feed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feed:
        asyncio.run(feed_main())
    elif args.strategy:
        asyncio.run(strategy_main(args.url, args.cluster, args.strategy))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
