"""Soak and chaos: a trading day's faults at once, with the invariants checked through it.

    .venv/bin/python bench/soak.py [--duration 300] [--instruments 9000] [--rate 1]
                                   [--clients 4] [--seed N] [--json] [--cluster | --sentinel]

Every part is a process of its own except the simulator, which the driver holds so that
it can inject faults and look at what Kite was told: a private redis-server,
``python -m publisher``, ``--clients`` strategy processes sending random requests
(subscribe, unsubscribe, mode, set with up to 2,500 tokens, release, rebalance, ttl
claims and garbage) over a universe of ``instruments * 4/3`` tokens, so capacity runs
out, and a consumer PSUBSCRIBEd to every tick channel that checks ``seq`` per token.

At random moments, one at a time: a connection dropped or stalled at the simulator,
Redis killed and restarted empty, frozen (SIGSTOP) past the lease, full (OOM) or read-only
(READONLY, as in a failover) for a few seconds, the leading publisher stopped with SIGTERM
or killed with SIGKILL (two run: the standby takes over, and a new standby is started).
Each fault's recovery time runs from its end (Redis answering again, say) until the
simulator holds exactly the persisted claims again on three live sessions. At checkpoints
(clients paused, the market held still): Kite's subscriptions equal the union of the persisted
claims with the richest mode; ``{ns}:token_conn`` and ``{ns}:token_mode`` agree with the
simulator; every ticked token's latest tick is in ``{ns}:last``; the control stream is
drained; and the figures of what could grow (publisher memory, Redis keys, streams).
At the end: no session ever over its limit, every request answered exactly once (none
lost but with Redis's data), no tick out of order, none received twice outside a fault (the
newest is republished when a write's fate is unknown), no gap in ``seq`` outside a fault.
Exit status 0 when every check held.

``--cluster`` runs it all on a private 3-master Redis Cluster (``KITEBUS_REDIS_CLUSTER=1``):
the consumer SSUBSCRIBEs every channel of the universe at its master, Redis's restart is
one master's (killed and restarted empty), and one more fault moves a slot to another
master (a tick channel's, or one of the contract's keys') while everything runs.

``--sentinel`` runs it on a primary, a replica and a sentinel: every part reaches Redis
through ``redis+sentinel://`` (the consumer asks the sentinel who is primary, and moves
when it names another), and Redis's faults are Sentinel's: ``sentinel_failover`` (a
manual ``SENTINEL FAILOVER``) and ``primary_killed`` (SIGKILL; the sentinel promotes the
replica, and the killed server comes back, empty, as the new primary's replica).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hiredis
import msgpack
import redis as sync_redis
import redis.asyncio as redis
from redis.crc import key_slot

from config import Keys
from config.keys import SERVING
from config.redisurl import parse_sentinel_url
from consumers.control import ControlClient, ControlTimeout
from kitebus.localredis import LocalCluster, LocalRedis, LocalSentinelSet, free_port
from kitewire.codec import MODE_RANK
from rediswire import bus, resp
from rediswire.tasks import cancel_and_wait
from simulator.server import DEFAULT_ACCESS_TOKEN, DEFAULT_API_KEY, TickerServer

NS = "soak"
LIMIT = 3000  # tokens per connection, the publisher's default
FAULTS = (
    "drop", "stall", "redis_restart", "redis_pause", "redis_oom", "redis_readonly", "publisher_term",
    "publisher_kill",
)  # fmt: skip
# A cluster node cannot be made a replica of a plain server: no READONLY fault there.
CLUSTER_FAULTS = (*(k for k in FAULTS if k != "redis_readonly"), "reshard")
SENTINEL_FAULTS = (
    "drop", "stall", "sentinel_failover", "primary_killed", "publisher_term", "publisher_kill",
)  # fmt: skip
FOLLOW_UPS = {b"live", b"rebalanced", b"expire"}
# Redis away or saying no for a while (OOM, READONLY, LOADING...): a client waits and goes on.
REDIS_ERRORS = bus.REDIS_FAULTS


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, n = entry_id.partition(b"-")
    return int(ms), int(n or 0)


def _token(i: int) -> int:
    return (i + 1) << 8 | 1  # generic NSE instruments


# --- a strategy process ------------------------------------------------------------------


async def run_client(
    name: str, url: str, pause: Path, universe: int, seed: int, until: float, cluster: bool
) -> None:
    """Random requests until ``until`` (epoch s), pausing while ``pause`` exists; prints counts."""
    rng = random.Random(seed)
    client = bus.connect(url, cluster, socket_timeout=5, socket_connect_timeout=2)
    control = ControlClient(client, NS)
    control_key = Keys(NS).control
    counts: Counter[str] = Counter()
    held: set[int] = set()
    ack = pause.with_name(f"{pause.name}.{name}")
    ops = ["subscribe", "unsubscribe", "mode", "set", "garbage", "release", "rebalance"]
    weights = [34, 24, 14, 8, 14, 2, 1]
    while time.time() < until:
        if pause.exists():  # noqa: ASYNC240 - a stat call between requests
            ack.touch()
            await asyncio.sleep(0.05)
            continue
        ack.unlink(missing_ok=True)
        op = rng.choices(ops, weights)[0]
        mode = rng.choice(["ltp", "quote", "full"])
        claims = op in ("subscribe", "mode", "set")
        ttl = rng.choice([None, None, None, rng.uniform(3, 20)]) if claims else None
        if op == "subscribe":
            tokens: list[Any] | None = [_token(rng.randrange(universe)) for _ in range(rng.randint(1, 60))]
        elif op in ("unsubscribe", "mode"):
            tokens = rng.sample(sorted(held), min(len(held), rng.randint(1, 40))) or [_token(0)]
        elif op == "set":
            tokens = [_token(rng.randrange(universe)) for _ in range(rng.randint(1, 2500))]
        elif op == "garbage":
            op, tokens = rng.choice([("subscribe", ["12x"]), ("bogus", [1]), ("mode", ["0"])])
        else:
            tokens = None
        try:
            run_id = await bus.run_id(client)
            try:
                asks = op in ("subscribe", "mode", "set")
                result = await control.request(
                    op, tokens, mode=mode if asks else None, client=name, ttl=ttl, timeout=20
                )
            except ControlTimeout as exc:
                # Redis restarted empty, or (Sentinel) the request was written to a primary
                # demoted before it replicated: gone with Redis's data, not unanswered.
                kept = await client.xrange(control_key, exc.request, exc.request)
                lost = await bus.run_id(client) != run_id or not kept
                counts["lost_with_redis" if lost else "unanswered"] += 1
                continue
        except REDIS_ERRORS:
            counts["redis_down"] += 1
            await asyncio.sleep(0.3)
            continue
        counts["requests"] += 1
        counts["ok" if result.ok else "not_ok"] += 1
        if op == "set" and result.ok:
            held = set(result.applied)
        elif op == "subscribe":
            held.update(result.applied)
        elif op == "unsubscribe":
            held.difference_update(result.applied)
        elif op == "release":
            held.clear()
        await asyncio.sleep(rng.uniform(0.02, 0.25))
    ack.touch()
    print(json.dumps(counts), flush=True)
    await client.aclose()


# --- the consumer process ----------------------------------------------------------------


def run_consumer(ports: list[int] | str, out: Path, universe: int) -> None:
    """Every tick channel: PSUBSCRIBE on one server; on a cluster (several ``ports``),
    SSUBSCRIBE each channel of the universe at its master; with a ``redis+sentinel://``
    URL, PSUBSCRIBE at the primary the sentinel names. Count ticks, seq gaps and repeats
    (with when), ticks out of order; write the figures to ``out`` every second; reconnect
    whenever Redis goes away (or, on a cluster, unsubscribes a moved slot's channels; with
    Sentinel, once it names another primary)."""
    stats: dict[str, Any] = {
        "received": 0, "gap_ticks": 0, "gaps": [], "duplicates": 0, "again": 0, "again_at": [],
        "reconnects": 0,
    }  # fmt: skip
    last: dict[int, tuple[int, int, float]] = {}  # token -> epoch, seq, received at
    written = 0.0
    stop = False

    def dump(*_: object) -> None:
        out.with_suffix(".tmp").write_text(json.dumps(stats))
        out.with_suffix(".tmp").replace(out)

    def finish(*_: object) -> None:
        nonlocal stop
        stop = True

    def take(payload: bytes) -> None:
        tick = msgpack.unpackb(payload)
        token, seq, epoch = tick["instrument_token"], tick["seq"], tick["epoch"]
        at = tick["received_at_ns"] / 1e9  # when the publisher got it from Kite
        stats["received"] += 1
        before = last.get(token)
        if before is not None and before[0] == epoch:
            since = before[2]  # the lost ticks were received after this, before ``at``
            if seq > before[1]:
                lost = seq - before[1] - 1
            elif at > before[2]:  # a newer tick, a lower seq: the token was claimed again, seq anew
                lost, since = seq - 1, at  # when it was claimed again is not known: only ``at`` is
            elif seq == before[1]:  # the newest again: republished after a write Redis may have taken
                stats["again"] += 1
                if len(stats["again_at"]) < 5000:
                    stats["again_at"].append(time.time())
                return
            else:
                stats["duplicates"] += 1
                return
            if lost:
                stats["gap_ticks"] += lost
                if len(stats["gaps"]) < 5000:
                    stats["gaps"].append([since, at, token, lost])
        last[token] = (epoch, seq, at)

    signal.signal(signal.SIGTERM, finish)
    while not stop:
        sockets: list[socket.socket] = []
        try:
            at = _sentinel_primary(ports) if isinstance(ports, str) else ports
            sockets = _subscribe(at, universe)
            readers = {sock: hiredis.Reader() for sock in sockets}
            asked = time.monotonic()
            while not stop:
                if isinstance(ports, str) and time.monotonic() - asked > bus.FOLLOW_INTERVAL:
                    asked = time.monotonic()
                    if _sentinel_primary(ports) != at:
                        raise ConnectionError("the sentinel names another primary")
                for sock in select.select(sockets, [], [], 0.5)[0]:
                    data = sock.recv(1 << 20)
                    if not data:
                        raise ConnectionError
                    reader = readers[sock]
                    reader.feed(data)
                    while (reply := reader.gets()) is not False:
                        if reply[0] in (b"pmessage", b"smessage"):
                            take(reply[-1])
                        elif reply[0] == b"sunsubscribe":  # its slot moved: subscribe at the new master
                            raise ConnectionError
                if time.time() - written > 0.5:
                    dump()
                    written = time.time()
        except (OSError, hiredis.ProtocolError):
            stats["reconnects"] += 1
            time.sleep(0.2)
        finally:
            for sock in sockets:
                sock.close()
    dump()


def _sentinel_primary(url: str) -> list[int]:
    """The port of the primary the sentinels of ``url`` name (all on loopback here)."""
    target = parse_sentinel_url(url)
    for host, port in target.sentinels:
        with contextlib.suppress(OSError, sync_redis.RedisError):
            client = sync_redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", target.service)
            finally:
                client.close()
            if reply:
                return [int(reply[1])]
    raise ConnectionError("no sentinel names a primary")


def _subscribe(ports: list[int], universe: int) -> list[socket.socket]:
    """Subscribed sockets: one PSUBSCRIBE on a server; a socket per master of a cluster."""
    if len(ports) == 1:
        sock = socket.create_connection(("127.0.0.1", ports[0]), timeout=1)
        sock.sendall(resp.command("PSUBSCRIBE", Keys(NS).ticks_pattern))
        return [sock]
    owner = None
    for port in ports:  # any node that answers and serves every slot
        with contextlib.suppress(OSError, sync_redis.RedisError):
            client = sync_redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                if b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"):
                    owner = [0] * bus.SLOTS
                    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        owner[start : end + 1] = [int(master[1])] * (end + 1 - start)
                    break
            finally:
                client.close()
    if owner is None:
        raise ConnectionError("no cluster node is ok")
    sockets = {p: socket.create_connection(("127.0.0.1", p), timeout=1) for p in set(owner)}
    commands: dict[int, list[bytes]] = {p: [] for p in sockets}
    for i in range(universe):
        channel = Keys(NS).ticks(_token(i))
        commands[owner[key_slot(channel.encode())]].append(resp.command("SSUBSCRIBE", channel))
    for port, sock in sockets.items():
        sock.sendall(b"".join(commands[port]))
    return list(sockets.values())


# --- the driver --------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float  # epoch seconds
    ended_at: float = 0.0  # the fault over (Redis answering again, the process restarted)
    recovered_at: float | None = None


@dataclass
class Soak:
    duration: float
    instruments: int
    rate: float
    clients: int
    seed: int
    kinds: tuple[str, ...] = FAULTS
    cluster: bool = False
    sentinel: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kitebus-soak-")))
    faults: list[Fault] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.keys = Keys(NS)
        self.redis_server: LocalRedis | LocalCluster | LocalSentinelSet
        if self.cluster:
            self.redis_server = LocalCluster(3)
        elif self.sentinel:
            self.redis_server = LocalSentinelSet(1)
        else:
            self.redis_server = LocalRedis(self.workdir / "redis", free_port())
            (self.workdir / "redis").mkdir()
        self.pause = self.workdir / "pause"
        self.consumer_out = self.workdir / "consumer.json"
        self.publishers: list[asyncio.subprocess.Process] = []  # the leader and a standby
        self.publisher_runs = 0
        self.results: Counter[bytes] = Counter()  # request id -> results seen
        self.result_ids: dict[bytes, list[bytes]] = {}  # request id -> its result entries' ids
        self.results_kept: set[bytes] = set()  # the result entries in the stream at the end
        self.results_lost = 0  # results in a stream Redis lost before they were read
        self.rss_mb: list[float] = []

    # --- the parts -----------------------------------------------------------------------

    async def start_publisher(self) -> None:
        """One more ``python -m publisher``: it leads if nobody does, else stands by."""
        env = {
            **os.environ, "KITE_WS_URL": self.simulator.url, "REDIS_URL": self.redis_server.url,
            "KITE_API_KEY": DEFAULT_API_KEY, "KITE_ACCESS_TOKEN": DEFAULT_ACCESS_TOKEN,
            "KITEBUS_NAMESPACE": NS, "KITEBUS_LOG_LEVEL": "WARNING",
            "KITEBUS_REDIS_CLUSTER": "1" if self.cluster else "0",
        }  # fmt: skip
        log = open(self.workdir / "publisher.log", "ab")  # noqa: ASYNC230 - opened once per start
        self.publishers.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "publisher", env=env, stdout=log, stderr=log
        ))  # fmt: skip
        log.close()
        self.publisher_runs += 1

    async def leader(self, client: redis.Redis) -> asyncio.subprocess.Process:
        """The publisher process that holds the lease (waiting up to a minute for one to)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(*REDIS_ERRORS):
                value = (await client.get(f"{NS}:leader") or b"").decode()
                pid = int(value.rsplit(":", 1)[1]) if value.count(":") == 2 else None
                for proc in self.publishers:
                    if proc.pid == pid:
                        return proc
            await asyncio.sleep(0.05)
        raise RuntimeError("no publisher took the lease within a minute")

    async def stop_leader(self, client: redis.Redis, sig: int) -> None:
        """Stop (or kill) the leader: the standby takes over; a new standby replaces it."""
        proc = await self.leader(client)
        proc.send_signal(sig)
        await proc.wait()
        self.publishers.remove(proc)

    @property
    def nodes(self) -> list[LocalRedis]:
        server = self.redis_server
        if isinstance(server, LocalSentinelSet):
            return server.servers
        return server.nodes if isinstance(server, LocalCluster) else [server]

    def connect(self, **kwargs: Any) -> bus.Client:
        return bus.connect(self.redis_server.url, self.cluster, **kwargs)

    def start_redis(self) -> None:
        """Start, with the pub/sub output buffer limit lifted: the publisher is what is
        measured, and a consumer that falls behind must not be cut."""
        self.redis_server.start()
        for node in self.nodes:
            self.lift_limit(node)

    @staticmethod
    def lift_limit(node: LocalRedis) -> None:
        client = sync_redis.Redis(port=node.port)
        try:
            client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        finally:
            client.close()

    async def restart_redis(self) -> None:
        """Kill Redis (on a cluster: one master) and start it again, empty."""
        node = self.rng.choice(self.nodes)
        process = node.process
        assert process is not None
        process.kill()
        process.wait()
        node.process = None
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        await asyncio.to_thread(node.start)
        self.lift_limit(node)
        if isinstance(self.redis_server, LocalCluster):
            await asyncio.to_thread(self.redis_server.wait_ok, 30)

    async def pause_redis(self) -> None:
        """Freeze Redis (on a cluster: one master) with SIGSTOP for longer than the lease."""
        node = self.rng.choice(self.nodes)
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.rng.uniform(1.0, 6.0))
        finally:
            os.kill(node.process.pid, signal.SIGCONT)

    async def fill_redis(self) -> None:
        """Every write refused with OOM for a while (maxmemory 1 byte with noeviction)."""
        admin = sync_redis.Redis(port=self.rng.choice(self.nodes).port)
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            await asyncio.sleep(self.rng.uniform(1.0, 5.0))
        finally:
            admin.config_set("maxmemory", "0")
            admin.close()

    async def demote_redis(self) -> None:
        """Every write refused with READONLY for a while, as in a failover: the server
        follows a copy of itself, which is then promoted and the server back."""
        node = self.rng.choice(self.nodes)
        copy = LocalRedis(self.workdir / f"copy-{len(self.faults)}", free_port())
        copy.workdir.mkdir()
        await asyncio.to_thread(copy.start)
        admin, mirror = sync_redis.Redis(port=node.port), sync_redis.Redis(port=copy.port)
        try:
            mirror.replicaof("127.0.0.1", node.port)
            deadline = time.monotonic() + 20
            while mirror.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("the copy never caught up")
                await asyncio.sleep(0.05)
            mirror.replicaof("no", "one")
            admin.replicaof("127.0.0.1", copy.port)
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))
        finally:
            admin.replicaof("no", "one")
            admin.close()
            mirror.close()
            await asyncio.to_thread(copy.stop)

    async def fail_over(self, kind: str) -> None:
        """``SENTINEL FAILOVER``, or the primary killed; once the sentinel names the replica,
        a killed primary is started again, empty, as its replica (ready for the next one)."""
        stack = self.redis_server
        assert isinstance(stack, LocalSentinelSet)
        old = await asyncio.to_thread(stack.primary_port)
        server = stack.server(old)
        if kind == "sentinel_failover":
            await asyncio.to_thread(stack.sentinels[0].failover)
        else:
            assert server.process is not None
            server.process.kill()
            server.process.wait()
            server.process = None
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(stack.primary_port) == old:
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel named no new primary within a minute")
            await asyncio.sleep(0.02)
        if kind == "primary_killed":
            await asyncio.to_thread(server.start)
            self.lift_limit(server)
            replica = sync_redis.Redis(port=server.port)
            try:
                replica.replicaof("127.0.0.1", stack.primary_port())
            finally:
                replica.close()
        await asyncio.to_thread(stack.wait_replica_known, 60)

    async def reshard(self) -> None:
        """Move one slot to another master: a tick channel's, or one of the contract's keys'."""
        assert isinstance(self.redis_server, LocalCluster)
        held = sorted(self.at_kite()) or [_token(0)]
        names = [self.keys.ticks(self.rng.choice(held)), self.keys.control, self.keys.control_results,
                 self.keys.last, self.keys.token_conn, self.keys.clients, self.keys.leader]  # fmt: skip
        slot = key_slot(self.rng.choice(names).encode())
        owner = await asyncio.to_thread(self.redis_server.owner, slot)
        to = self.rng.choice([i for i in range(len(self.nodes)) if i != owner])
        await asyncio.to_thread(self.redis_server.move_slot, slot, to)

    async def publisher_rss_mb(self, client: bus.Client) -> float:
        with open(f"/proc/{(await self.leader(client)).pid}/status") as status:  # noqa: ASYNC230
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    async def audit_results(self) -> None:
        """Count results per request id, following the stream across Redis restarts."""
        cursor, run_id = b"0-0", None
        seen: set[bytes] = set()
        while True:
            try:
                client = self.connect(socket_timeout=5)
                while True:
                    now_id = await bus.run_id(client)
                    if now_id != run_id:
                        cursor, run_id = b"0-0", now_id
                    reply = await client.xread({self.keys.control_results: cursor}, count=1000, block=500)
                    for _, entries in reply or []:
                        for entry_id, fields in entries:
                            cursor = entry_id
                            if entry_id in seen:  # read again after another cluster node restarted
                                continue
                            seen.add(entry_id)
                            if fields.get(b"op") not in FOLLOW_UPS:
                                self.results[fields[b"request"]] += 1
                                self.result_ids.setdefault(fields[b"request"], []).append(entry_id)
            except REDIS_ERRORS:
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    # --- what must hold ------------------------------------------------------------------

    async def desired(self, client: redis.Redis) -> dict[int, str]:
        """The union of the persisted claims, each token with the richest mode asked."""
        modes: dict[int, str] = {}
        for raw in await client.smembers(self.keys.clients):
            for token, mode in (await client.hgetall(self.keys.claims(raw.decode()))).items():
                t, m = int(token), mode.decode()
                if t not in modes or MODE_RANK[m] > MODE_RANK[modes[t]]:
                    modes[t] = m
        return modes

    def at_kite(self) -> dict[int, str]:
        return {t: m for s in self.simulator.sessions for t, m in s.modes.items()}

    async def converged(self, client: redis.Redis) -> bool:
        sessions = self.simulator.sessions
        if len(sessions) != 3 or any(s.stalled for s in sessions):
            return False
        status = await client.hgetall(self.keys.status)
        serving = status.get(b"state", b"").decode() in SERVING
        fresh = time.time() - float(status.get(b"heartbeat_at", 0)) < 3 and serving
        return fresh and await self.desired(client) == self.at_kite()

    async def wait_converged(self, client: redis.Redis, timeout: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if await self.converged(client):
                    return time.monotonic() - started
            except REDIS_ERRORS:
                pass
            await asyncio.sleep(0.05)
        return None

    async def checkpoint(self, client: redis.Redis, final: bool) -> None:
        self.pause.touch()
        names = [f"c{i}" for i in range(self.clients)]
        deadline = time.monotonic() + 40
        while not all(self.pause.with_name(f"{self.pause.name}.{n}").exists() for n in names):
            if time.monotonic() > deadline:
                self.failures.append("clients did not pause within 40 s")
                break
            await asyncio.sleep(0.05)
        took = await self.wait_converged(client, 40)
        point: dict[str, Any] = {"at": round(time.monotonic() - self.started, 1), "converged_s": took}
        if took is None:
            want, have = await self.desired(client), self.at_kite()
            missing, extra = set(want) - set(have), set(have) - set(want)
            wrong = sum(1 for t in set(want) & set(have) if want[t] != have[t])
            self.failures.append(
                f"checkpoint {len(self.checkpoints) + 1}: Kite does not hold the claims: "
                f"{len(missing)} missing, {len(extra)} extra, {wrong} in the wrong mode"
            )
        else:
            await self.check_hashes(client)
        deadline = time.monotonic() + 40
        while True:  # every request answered: nothing pending or unread in the control group
            groups = await client.xinfo_groups(self.keys.control)
            if not groups:  # Redis restarted empty a moment ago: the publisher creates it again
                if time.monotonic() > deadline:
                    self.failures.append("the control stream's consumer group was not created again")
                    break
                await asyncio.sleep(0.05)
                continue
            group = groups[0]
            # ``lag`` is off after a replica's promotion (its count of entries read is not
            # replicated exactly): the last delivered id tells what is unread.
            newest = await client.xrevrange(self.keys.control, count=1)
            unread = bool(newest) and newest[0][0] != group["last-delivered-id"]
            if not group["pending"] and (not group["lag"] or not unread):
                break
            await asyncio.sleep(0.05)
        await self.check_last(client)
        memory = await client.info("memory")
        if "used_memory" not in memory:  # a cluster answers for each node
            memory = {"used_memory": sum(node["used_memory"] for node in memory.values())}
        point |= {
            "tokens": len(self.at_kite()),
            "publisher_rss_mb": round(await self.publisher_rss_mb(client), 1),
            "redis_keys": await client.dbsize(),
            "redis_used_mb": round(memory["used_memory"] / 2**20, 1),
            "control_len": await client.xlen(self.keys.control),
            "results_len": await client.xlen(self.keys.control_results),
            "last_len": await client.hlen(self.keys.last),
        }
        self.rss_mb.append(point["publisher_rss_mb"])
        self.checkpoints.append(point)
        if not final:
            self.pause.unlink()

    async def check_hashes(self, client: redis.Redis) -> None:
        want = await self.desired(client)
        modes = {int(t): m.decode() for t, m in (await client.hgetall(self.keys.token_mode)).items()}
        conns = {int(t): c.decode() for t, c in (await client.hgetall(self.keys.token_conn)).items()}
        if modes != want:
            differ = len(set(modes.items()) ^ set(want.items()))
            self.failures.append(f"token_mode disagrees with the claims on {differ} entries")
        groups: dict[str, set[int]] = {}
        for token, index in conns.items():
            groups.setdefault(index, set()).add(token)
        at_kite = sorted(sorted(s.modes) for s in self.simulator.sessions if s.modes)
        if sorted(sorted(g) for g in groups.values()) != at_kite:
            self.failures.append("token_conn does not group the tokens as the simulator's sessions hold them")

    async def check_last(self, client: redis.Redis) -> None:
        """Hold the market still; once the publisher has published what it got, every
        token's latest tick must be the one in ``{ns}:last``."""
        self.simulator.paused = True
        try:
            stable, before = 0, None
            while stable < 3:
                await asyncio.sleep(0.5)
                now = await client.hget(self.keys.status, "published")
                stable = stable + 1 if now == before else 0
                before = now
            want = self.at_kite()
            sent = {t: v for t, v in self.simulator.last_sent.items() if t in want and v[0] == want[t]}
            raw = await client.hmget(self.keys.last, [str(t) for t in sent]) if sent else []
            wrong = 0
            for (mode, price), payload in zip(sent.values(), raw, strict=True):
                tick = msgpack.unpackb(payload) if payload else None
                if tick is None or tick["mode"] != mode or tick["last_price"] != price:
                    wrong += 1
            if wrong:
                self.failures.append(f"{wrong} of {len(sent)} ticked tokens lack their latest tick in :last")
            # A release (a ttl can lapse even now) reaches :last at the next prune, within a
            # second: only a snapshot that outlives that is stale for good.
            deadline = time.monotonic() + 5
            while (stale := {int(k) for k in await client.hkeys(self.keys.last)} - set(self.at_kite())):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if stale:
                epoch = int(await client.hget(self.keys.status, "epoch") or 0)
                samples = []
                for token in sorted(stale)[:3]:
                    tick = msgpack.unpackb(await client.hget(self.keys.last, str(token)))
                    samples.append(
                        f"{token}: epoch {'now' if tick['epoch'] == epoch else tick['epoch']}, "
                        f"received {tick['received_at_ns'] / 1e9:.2f}, seq {tick['seq']}"
                    )
                self.failures.append(
                    f"{len(stale)} released tokens still have a snapshot in :last, e.g. {'; '.join(samples)}"
                )
        finally:
            self.simulator.paused = False

    # --- faults --------------------------------------------------------------------------

    async def inject(self, kind: str, client: redis.Redis) -> None:
        fault = Fault(kind, time.time())
        self.faults.append(fault)
        if kind == "drop":
            self.simulator.drop(self.rng.choice(self.simulator.sessions).id)
        elif kind == "stall":
            self.simulator.stall(8, self.rng.choice(self.simulator.sessions).id)
        elif kind == "redis_restart":
            await self.restart_redis()
        elif kind == "redis_pause":
            await self.pause_redis()
        elif kind == "redis_oom":
            await self.fill_redis()
        elif kind == "redis_readonly":
            await self.demote_redis()
        elif kind == "reshard":
            await self.reshard()
        elif kind in ("sentinel_failover", "primary_killed"):
            await self.fail_over(kind)
        else:
            await self.stop_leader(client, signal.SIGTERM if kind == "publisher_term" else signal.SIGKILL)
            await self.start_publisher()
        fault.ended_at = time.time()
        took = await self.wait_converged(client, 60)
        if took is None:
            self.failures.append(f"no recovery within 60 s after {kind}")
        else:
            fault.recovered_at = time.time()

    # --- the run -------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.start_redis()
        self.simulator = TickerServer(rate=self.rate, heartbeat_interval=1.0, seed=self.seed)
        await self.simulator.start()
        universe = self.instruments * 4 // 3
        ports = ",".join(str(node.port) for node in self.nodes)
        if isinstance(self.redis_server, LocalSentinelSet):
            ports = self.redis_server.url  # the consumer asks the sentinel
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--role", "consumer", "--ports", ports,
            "--out", str(self.consumer_out), "--universe", str(universe),
        )  # fmt: skip
        client = self.connect(socket_timeout=10)
        await self.start_publisher()
        await self.leader(client)
        await self.start_publisher()  # the standby
        auditor = asyncio.create_task(self.audit_results())
        clients: list[asyncio.subprocess.Process] = []
        try:
            await self.wait_converged(client, 30)
            self.started = time.monotonic()
            until = time.time() + self.duration
            for i in range(self.clients):
                clients.append(await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--role", "client", "--name", f"c{i}",
                    "--url", self.redis_server.url, "--pause", str(self.pause), "--universe", str(universe),
                    "--seed", str(self.seed * 100 + i), "--until", str(until),
                    *(["--cluster"] if self.cluster else []), stdout=asyncio.subprocess.PIPE,
                ))  # fmt: skip
            kinds: list[str] = []
            next_checkpoint = self.started + max(60.0, self.duration / 5)
            while time.time() < until - 3:
                await asyncio.sleep(self.rng.uniform(min(5, self.duration / 8), min(14, self.duration / 4)))
                if time.time() >= until - 3:
                    break
                if not kinds:
                    kinds = list(self.kinds)
                    self.rng.shuffle(kinds)
                await self.inject(kinds.pop(), client)
                if time.monotonic() > next_checkpoint and time.time() < until - 20:
                    await self.checkpoint(client, final=False)
                    next_checkpoint = time.monotonic() + max(60.0, self.duration / 5)
            counts: Counter[str] = Counter()
            for proc in clients:
                out, _ = await proc.communicate()
                counts.update(json.loads(out or b"{}"))
            await self.checkpoint(client, final=True)
            await asyncio.sleep(1.0)  # the auditor reads the last results
            self.results_kept = {i for i, _ in await client.xrange(self.keys.control_results)}
            return self.report(counts, await self.consumer_figures())
        finally:
            await cancel_and_wait(auditor)  # redis-py can swallow one cancel
            for proc in clients:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if consumer.returncode is None:
                consumer.terminate()
                await consumer.wait()
            for proc in self.publishers:
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()
            await client.aclose()
            await self.simulator.close()
            self.redis_server.stop()
            if not self.failures:  # kept for its logs otherwise
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def consumer_figures(self) -> dict[str, Any]:
        await asyncio.sleep(1.0)
        return json.loads(self.consumer_out.read_text()) if self.consumer_out.exists() else {}

    def report(self, counts: Counter[str], consumer: dict[str, Any]) -> dict[str, Any]:
        # a gap is a fault's when the ticks it lost were received within the fault's window
        windows = [(f.at - 1, (f.recovered_at or f.at + 60) + 2) for f in self.faults]
        gaps = consumer.get("gaps", [])
        outside = [g for g in gaps if not any(g[0] <= b and g[1] >= a for a, b in windows)]
        twice = [r for r, n in self.results.items() if n > 1]
        # A result read from a primary that was demoted before it replicated is lost with it;
        # the new primary's publisher answers the request again (its pending entry came back).
        # (One trimmed off the stream's head is not lost: it counts as kept.)
        first = min(self.results_kept, key=_entry_key, default=b"0-0")

        def kept(entry: bytes) -> bool:
            return entry in self.results_kept or _entry_key(entry) < _entry_key(first)

        again = [r for r in twice if sum(map(kept, self.result_ids[r])) <= 1]
        duplicates = len(twice) - len(again)
        if self.simulator.peak > LIMIT:
            self.failures.append(f"a session held {self.simulator.peak} tokens, over the limit of {LIMIT}")
        if duplicates:
            self.failures.append(f"{duplicates} requests got more than one result")
        if counts["unanswered"]:
            self.failures.append(f"{counts['unanswered']} requests unanswered although Redis kept its data")
        if consumer.get("duplicates"):
            self.failures.append(f"the consumer got {consumer['duplicates']} ticks out of order")
        again_outside = [t for t in consumer.get("again_at", []) if not any(a <= t <= b for a, b in windows)]
        if again_outside:
            self.failures.append(f"the consumer got {len(again_outside)} ticks twice outside any fault")
        outside_ticks = sum(g[3] for g in outside)
        if outside:
            self.failures.append(f"{len(outside)} seq gaps ({outside_ticks} ticks) outside any fault")
        if self.rss_mb and max(self.rss_mb) > 500:
            self.failures.append(f"the publisher grew to {max(self.rss_mb):.0f} MB")
        last = self.checkpoints[-1] if self.checkpoints else {}
        if last and (last["control_len"] > 1000 or last["results_len"] > 11_000):
            lengths = f"control {last['control_len']}, results {last['results_len']}"
            self.failures.append(f"streams not capped: {lengths}")
        received = consumer.get("received", 0)
        recovery: dict[str, list[float]] = {}
        for f in self.faults:
            if f.recovered_at is not None:
                recovery.setdefault(f.kind, []).append(f.recovered_at - f.ended_at)
        return {
            "ok": not self.failures,
            "failures": self.failures,
            "machine": f"{os.cpu_count()} cpus",
            "duration_s": self.duration,
            "instruments": self.instruments,
            "rate": self.rate,
            "faults": dict(Counter(f.kind for f in self.faults)),
            "fault_times": [[f.kind, round(f.at, 2), round(f.recovered_at or 0, 2)] for f in self.faults],
            "recovery_s": {
                k: {"p50": round(statistics.median(v), 2), "max": round(max(v), 2)}
                for k, v in sorted(recovery.items())
            },
            "requests": dict(counts),
            "results_audited": len(self.results),
            "answered_again_after_failover": len(again),
            "ticks": {
                "sent_by_simulator": self.simulator.sent,
                "received_by_consumer": consumer.get("received", 0),
                "seq_gaps_during_faults": consumer.get("gap_ticks", 0) - outside_ticks,
                "seq_gaps_outside_faults_detail": outside[:20],
                "seq_gaps_outside_faults": outside_ticks,
                "not_published": self.simulator.sent - received - consumer.get("gap_ticks", 0),
                "consumer_reconnects": consumer.get("reconnects", 0),
                # the newest tick of a token again: republished when a write's fate was unknown
                "received_again_during_faults": consumer.get("again", 0) - len(again_outside),
            },
            "peak_tokens_per_connection": self.simulator.peak,
            "publisher_runs": self.publisher_runs,
            "checkpoints": self.checkpoints,
            "workdir": str(self.workdir),
        }


def print_report(report: dict[str, Any]) -> None:
    verdict = "ALL CHECKS HELD" if report["ok"] else "FAILED"
    print(f"soak: {report['duration_s']:g} s, {report['instruments']} instruments at {report['rate']:g} "
          f"tick/s each, {report['machine']}; {verdict}")  # fmt: skip
    for failure in report["failures"]:
        print(f"  FAILED: {failure}")
    print(f"faults      {report['faults']}  (publisher runs {report['publisher_runs']})")
    for kind, figures in report["recovery_s"].items():
        print(f"  recovery  {kind:15} p50 {figures['p50']:6.2f} s  max {figures['max']:6.2f} s")
    again = report["answered_again_after_failover"]
    print(f"requests    {report['requests']}; results audited {report['results_audited']}"
          f" (answered again after its result was lost with a demoted primary: {again})")
    print(f"ticks       {report['ticks']}")
    print(f"peak tokens on one connection {report['peak_tokens_per_connection']} (limit {LIMIT})")
    for point in report["checkpoints"]:
        print(f"checkpoint  {point}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--instruments", type=int, default=9000)
    parser.add_argument("--rate", type=float, default=1.0, help="ticks per second per instrument")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cluster", action="store_true", help="on a private 3-master Redis Cluster")
    parser.add_argument("--sentinel", action="store_true", help="on a primary, a replica and a sentinel")
    parser.add_argument("--faults", default="", help="the kinds to inject, in turn (default: every kind)")
    for hidden in ("--role", "--name", "--url", "--pause", "--out", "--ports"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--universe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        asyncio.run(run_client(
            args.name, args.url, Path(args.pause), args.universe, args.seed, args.until, args.cluster
        ))  # fmt: skip
        return 0
    if args.role == "consumer":
        if args.ports.startswith("redis+sentinel://"):
            run_consumer(args.ports, Path(args.out), args.universe)
        else:
            run_consumer([int(p) for p in args.ports.split(",")], Path(args.out), args.universe)
        return 0
    if args.cluster and args.sentinel:
        parser.error("--cluster or --sentinel, not both")
    known = CLUSTER_FAULTS if args.cluster else SENTINEL_FAULTS if args.sentinel else FAULTS
    kinds = tuple(k for k in args.faults.split(",") if k) or known
    if not set(kinds) <= set(known):
        parser.error(f"--faults: choose from {', '.join(known)}")
    soak = Soak(args.duration, args.instruments, args.rate, args.clients, args.seed, kinds,
                args.cluster, args.sentinel)  # fmt: skip
    report = asyncio.run(soak.run())
    print(json.dumps(report) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
