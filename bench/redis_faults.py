"""Redis faults under a running publisher, each measured as a strategy would see it.

    .venv/bin/python bench/redis_faults.py [--faults restart:3,pause:8,...] [--tokens 3000]
                                           [--standby] [--json]

For each fault a fresh stack: a private redis-server without persistence, the simulator
(held by this driver, so that it sees every handshake), ``python -m publisher`` (and a
standby with ``--standby``), claims of two clients over ``--tokens`` instruments, a
consumer PSUBSCRIBEd to every tick channel that checks ``seq``, and a client whose
requests keep coming through the fault. Faults (``KIND:SECONDS``):

- ``restart``: Redis killed (SIGKILL) and started again, empty, that much later;
- ``pause``: Redis stopped (SIGSTOP) and continued (SIGCONT);
- ``readonly``: Redis made a replica of a copy of itself, then a primary again;
- ``oom``: ``maxmemory 1`` with ``noeviction``, then no limit;
- ``misconf``: a snapshot that fails (its directory removed), so writes are refused;
- ``noperm``: the publisher's ACL user loses its write commands, then gets them back;
- ``busy``: a script that loops until ``SCRIPT KILL``;
- ``loading``: Redis restarted with a snapshot it reads slowly (answers LOADING);
- ``partition`` (with ``--standby``): the leader cut off from a Redis the standby still
  reaches (its sockets through a proxy that stops forwarding), then reconnected;
- ``sentinel_failover``: on a primary, a replica and a sentinel (everything reaching Redis
  through ``redis+sentinel://``), ``SENTINEL FAILOVER``; SECONDS is not used;
- ``primary_killed``: the same stack, the primary killed (SIGKILL) and not started again;
  the sentinel judges it down after 1 s and promotes the replica.

From the moment Redis answers again (or the partition begins, for ``partition``; or the
sentinel names the new primary, for the Sentinel faults: ``named s`` after the fault), each
row gives: the first tick on the bus, every claimed token ticking again (the simulator
ticks each about once a second, so about 1 s is the floor), every claim back (claims, ``token_conn``,
``token_mode``, ``{ns}:last`` for every token, instruments, the consumer group), the next
request answered; then ticks conflated and dropped, requests answered twice (must be 0), Kite
handshakes during the fault (0 when only Redis failed and no standby runs) and ``seq``
gaps at the consumer. Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import msgpack
import redis as sync_redis

from config import Keys
from config.keys import CONTROL_GROUP, SERVING
from consumers.control import ControlClient
from kitebus.localredis import LocalRedis, LocalSentinelSet, free_port
from rediswire import bus
from rediswire.tasks import cancel_and_wait
from simulator.server import TickerServer

NS = "faults"
INSTRUMENTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "instruments.csv"
FOLLOW_UPS = {"live", "rebalanced", "expire"}
SENTINEL_KINDS = ("sentinel_failover", "primary_killed")
KINDS = ("restart", "pause", "readonly", "oom", "misconf", "noperm", "busy", "loading", "partition",
         *SENTINEL_KINDS)  # fmt: skip
ACL_USER, ACL_PASSWORD = "kitebus", "s3cret-pw"


def token(i: int) -> int:
    return (i + 1) << 8 | 1  # generic NSE instruments


@dataclass
class Figures:
    """What one fault cost, seen from outside the publisher."""

    fault: str
    seconds: float
    standby: bool
    first_tick_s: float | None = None  # after Redis answered again
    all_ticking_s: float | None = None  # every claimed token has ticked again (they tick about 1/s)
    claims_back_s: float | None = None
    request_answered_s: float | None = None
    takeover_s: float | None = None  # partition: from the cut to the standby leading with sockets
    named_s: float | None = None  # Sentinel faults: from the fault to the new primary named
    conflated: int = 0
    dropped: int = 0  # ticks in writes that failed or were refused (their tokens' newest went again)
    answered_twice: int = 0
    handshakes: int = 0  # Kite handshakes while the fault lasted and after it
    seq_gaps: int = 0  # tokens whose seq jumped in what the publisher sent
    seq_gaps_reconnect: int = 0  # ... across the consumer's own reconnect
    consumer_reconnects: int = 0
    repeats: int = 0  # ticks received again (same seq)
    leaders: int = 0  # publishers that lead at the end (must be 1)
    task_restarts: int = 0  # long-lived tasks of the leader that ended and were restarted (must be 0)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# --- the parts ---------------------------------------------------------------------------


class Consumer:
    """Every tick channel of the namespace, reconnecting as Redis comes and goes."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.last_at = 0.0  # monotonic time of the newest tick
        self.token_at: dict[int, float] = {}  # token -> monotonic time of its newest tick
        self.ticks = 0
        self.gaps = 0  # seq gaps in the publisher's output (conflated or dropped ticks)
        self.gaps_reconnect = 0  # ... across this consumer's own reconnects (pub/sub is at most once)
        self.reconnects = 0
        self.repeats = 0  # a tick whose seq was seen already
        self.seq: dict[int, tuple[int, int]] = {}  # token -> (epoch, seq)
        self._rejoined: set[int] = set()  # tokens not yet seen since the last reconnect
        self.epochs: list[int] = []  # in the order they were first seen
        self.stale_epoch_after_new = 0  # ticks of an older epoch after a newer one was seen
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)  # redis-py can swallow one cancel

    async def _run(self) -> None:
        first = True
        while True:
            if not first:  # a reconnect: what was published meanwhile is not ours to see
                self._reconnected(None)
            first = False
            client = bus.connect(self._url, False, socket_connect_timeout=0.5)
            try:
                pubsub = client.pubsub()
                await pubsub.psubscribe(f"{NS}:ticks:*")
                # redis-py's PubSub reconnects (and subscribes again) by itself: count those too
                pubsub.connection.register_connect_callback(self._reconnected)
                asked = time.monotonic()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if message is not None:
                        self._take(msgpack.unpackb(message["data"]))
                    if bus.is_sentinel(client) and time.monotonic() - asked > bus.FOLLOW_INTERVAL:
                        asked = time.monotonic()  # redis-py's PubSub keeps its connection: follow
                        connection = pubsub.connection
                        if await bus.primary_address(self._url) != (connection.host, connection.port):
                            break  # another primary named: reconnect to it
            except (*bus.REDIS_FAULTS, TimeoutError):
                await asyncio.sleep(0.05)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _reconnected(self, _connection: object) -> None:
        self.reconnects += 1
        self._rejoined = set(self.seq)

    def _take(self, tick: dict[str, Any]) -> None:
        self.ticks += 1
        self.last_at = time.monotonic()
        epoch, seq, instrument = tick["epoch"], tick["seq"], tick["instrument_token"]
        self.token_at[instrument] = self.last_at
        if epoch not in self.epochs:
            self.epochs.append(epoch)
        elif epoch != self.epochs[-1]:
            self.stale_epoch_after_new += 1
        previous = self.seq.get(instrument)
        rejoined = instrument in self._rejoined
        self._rejoined.discard(instrument)
        if previous is not None and previous[0] == epoch and seq <= previous[1]:
            self.repeats += 1  # the newest tick again (a republish after a failed write): not lost
        elif previous is not None and previous[0] == epoch and seq != previous[1] + 1:
            if rejoined:
                self.gaps_reconnect += 1
            else:
                self.gaps += 1
        self.seq[instrument] = (epoch, seq)


class Proxy:
    """A TCP relay to Redis for one publisher; ``cut`` makes it a black hole (nothing is
    forwarded, connections hang), ``heal`` closes what it held so the client reconnects."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut_off = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if not self.cut_off:
                    writer.write(data)
                    await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.transport.abort()


class Rig:
    """One fault's stack: Redis, the simulator, the publisher(s), claims, a consumer."""

    def __init__(
        self, tokens: int, standby: bool, acl: bool = False, proxy: bool = False, sentinel: bool = False
    ) -> None:
        """``sentinel``: a primary, a replica and a sentinel, reached through the sentinel."""
        self.workdir = Path(tempfile.mkdtemp(prefix="kitebus-faults-"))
        self.sentinels = LocalSentinelSet(1) if sentinel else None
        if self.sentinels is not None:
            self.redis = self.sentinels.servers[0]
        else:
            self.redis = LocalRedis(self.workdir, extra=("--enable-protected-configs", "local"))
        self.tokens = [token(i) for i in range(tokens)]
        self.standby = standby
        self.acl = acl
        self.proxy: Proxy | None = None
        self._want_proxy = proxy
        self.keys = Keys(NS)
        self.simulator = TickerServer(rate=1, max_rate=5000, heartbeat_interval=0.5)
        self.publishers: list[asyncio.subprocess.Process] = []
        self.consumer: Consumer | None = None
        self.expected: dict[str, dict[int, str]] = {}
        self.seen_before: dict[int, tuple[int, int]] = {}  # token -> (epoch, seq) seen when the fault began
        self.requests: list[str] = []

    @property
    def admin_url(self) -> str:
        return self.sentinels.url if self.sentinels is not None else self.redis.url

    def publisher_url(self, port: int | None = None) -> str:
        if self.sentinels is not None:
            return self.sentinels.url
        auth = f"{ACL_USER}:{ACL_PASSWORD}@" if self.acl else ""
        return f"redis://{auth}127.0.0.1:{port or self.redis.port}/0"

    async def __aenter__(self) -> Rig:
        if self.sentinels is not None:
            await asyncio.to_thread(self.sentinels.start)
        else:
            self.redis.start()
        if self.acl:
            grant = ("on", f">{ACL_PASSWORD}", "~*", "&*", "+@all")
            self.admin().execute_command("ACL", "SETUSER", ACL_USER, *grant)
        await self.simulator.start()
        if self._want_proxy:
            self.proxy = Proxy(self.redis.port)
            await self.proxy.start()
        first = self.proxy.port if self.proxy else None
        self.publishers.append(await self._publisher(self.publisher_url(first), "first"))
        self.rds = bus.connect(self.admin_url, False, socket_timeout=5)
        await _until(lambda: self._leader_pid(), 20)
        await _until(lambda: len(self.simulator.sessions) == 3, 20)
        if self.standby:
            self.publishers.append(await self._publisher(self.publisher_url(), "second"))
            await _until(lambda: self.rds.hget(self.keys.standby, "pid"), 20)
        control = ControlClient(self.rds, NS)
        half = len(self.tokens) // 2
        claims = (("alpha", self.tokens[:half], "full"), ("beta", self.tokens[half:], "ltp"))
        for client, tokens, mode in claims:
            for start in range(0, len(tokens), 1000):
                chunk = tokens[start : start + 1000]
                result = await control.subscribe(chunk, mode=mode, client=client, timeout=30)
                self.requests.append(result.request)
            self.expected[client] = dict.fromkeys(tokens, mode)
        wanted = {t: "full" for t in self.tokens[:half]} | {t: "ltp" for t in self.tokens[half:]}
        await _until(lambda: self.at_kite() == wanted, 30)
        self.consumer = Consumer(self.admin_url)
        self.consumer.start()
        await _until(lambda: self.consumer.ticks > len(self.tokens), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.consumer is not None:
            await self.consumer.close()
        for process in self.publishers:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        if self.proxy is not None:
            await self.proxy.close()
        with contextlib.suppress(Exception):
            await self.rds.aclose()
        await self.simulator.close()
        if self.redis.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.process.pid, signal.SIGCONT)
        self.redis.stop()
        if self.sentinels is not None:
            self.sentinels.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _publisher(self, url: str, name: str) -> asyncio.subprocess.Process:
        env = {
            **os.environ, "KITE_WS_URL": self.simulator.url, "REDIS_URL": url, "KITE_API_KEY": "kitebus",
            "KITE_ACCESS_TOKEN": "simulator", "KITEBUS_NAMESPACE": NS,
            "KITEBUS_INSTRUMENTS": str(INSTRUMENTS), "KITEBUS_LOG_LEVEL": "INFO",
        }  # fmt: skip
        log = os.open(self.workdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "publisher", env=env, stdout=log, stderr=log
            )
        finally:
            os.close(log)

    def admin(self) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.redis.port, socket_timeout=10)

    def at_kite(self) -> dict[int, str]:
        return {t: m for s in self.simulator.sessions for t, m in s.modes.items()}

    async def _leader_pid(self) -> int | None:
        value = (await self.rds.get(self.keys.leader) or b"").decode()
        return int(value.rsplit(":", 1)[1]) if value.count(":") == 2 else None

    async def claims_back(self) -> bool:
        """Everything the publisher keeps in Redis is there again."""
        keys, rds = self.keys, self.rds
        for client, held in self.expected.items():
            stored = await rds.hgetall(keys.claims(client))
            if {int(t): m.decode() for t, m in stored.items()} != held:
                return False
        wanted = {t: m for held in self.expected.values() for t, m in held.items()}
        modes = await rds.hgetall(keys.token_mode)
        conns = await rds.hkeys(keys.token_conn)
        last = {int(t): msgpack.unpackb(v) for t, v in (await rds.hgetall(keys.last)).items()}
        if {int(t) for t in conns} < wanted.keys() or last.keys() < wanted.keys():
            return False
        for t, (epoch, seq) in self.seen_before.items():  # each snapshot no older than before the fault
            if t in wanted and (last[t]["epoch"], last[t]["seq"]) < (epoch, seq):
                return False
        if any(modes.get(str(t).encode(), b"").decode() != m for t, m in wanted.items()):
            return False
        if not await rds.hlen(keys.instruments):
            return False
        groups = await rds.xinfo_groups(keys.control)
        return any(g["name"].decode() == CONTROL_GROUP for g in groups)

    async def answered_twice(self) -> int:
        counts: Counter[str] = Counter()
        for _, fields in await self.rds.xrange(self.keys.control_results):
            op, request = fields.get(b"op", b"").decode(), fields.get(b"request", b"").decode()
            if request and op not in FOLLOW_UPS:
                counts[request] += 1
        return sum(1 for n in counts.values() if n > 1)

    async def leaders(self) -> int:
        """1 when a publisher that runs holds the lease and its status, with a fresh heartbeat,
        says it serves (waiting a few seconds for the first heartbeat after the fault)."""
        with contextlib.suppress(TimeoutError):
            await _until(self._leads, 5)
        return int(await self._leads())

    async def _leads(self) -> bool:
        status = await self.rds.hgetall(self.keys.status)
        fresh = time.time() - float(status.get(b"heartbeat_at", 0) or 0) < 3
        serving = status.get(b"state", b"").decode() in SERVING
        alive = [p for p in self.publishers if p.returncode is None]
        return fresh and serving and await self._leader_pid() in {p.pid for p in alive}


RECOVERY_BUDGET = 45.0  # seconds for everything to come back after a fault ends


async def _until(check: Any, timeout: float, interval: float = 0.02) -> float:
    """Poll ``check`` until truthy; seconds it took (raises TimeoutError)."""
    started = time.monotonic()
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
        except (*bus.REDIS_FAULTS, TimeoutError):
            result = None
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout}s")
        await asyncio.sleep(interval)


class Requester:
    """A client whose requests keep coming through the fault (each with a fresh id), so that
    'answered twice' has something to catch."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)  # redis-py can swallow one cancel

    async def _run(self) -> None:
        client = bus.connect(self._url, False, socket_timeout=1, socket_connect_timeout=0.5)
        keys = Keys(NS)
        try:
            while True:
                op = "subscribe" if self.sent % 2 == 0 else "unsubscribe"
                try:
                    entry = {"op": op, "tokens": str(token(90_000)), "client": "churn"}
                    await client.xadd(keys.control, entry)
                    self.sent += 1
                except (*bus.REDIS_FAULTS, TimeoutError):
                    pass
                await asyncio.sleep(0.3)
        finally:
            await client.aclose()


# --- the faults --------------------------------------------------------------------------


async def _fail_over(rig: Rig, kind: str, figures: Figures | None) -> None:
    """``SENTINEL FAILOVER``, or the primary killed; returns once the sentinel names the
    replica primary (and the replica says it is one)."""
    assert rig.sentinels is not None
    sentinel = rig.sentinels.sentinels[0]
    old = await asyncio.to_thread(rig.sentinels.primary_port)
    began = time.monotonic()
    if kind == "sentinel_failover":
        await asyncio.to_thread(sentinel.failover)
    else:
        server = rig.sentinels.server(old)
        assert server.process is not None
        server.process.kill()
        server.process.wait()
    await _until(lambda: asyncio.to_thread(lambda: rig.sentinels.primary_port() != old), 60, 0.01)
    if figures is not None:
        figures.named_s = time.monotonic() - began
    rig.redis = rig.sentinels.server(rig.sentinels.primary_port())


async def _inject(rig: Rig, kind: str, seconds: float, figures: Figures | None = None) -> None:
    """Cause the fault, hold it ``seconds``, end it; returns once Redis answers again."""
    server = rig.redis
    assert server.process is not None
    if kind in SENTINEL_KINDS:
        await _fail_over(rig, kind, figures)
    elif kind == "restart":
        server.process.kill()
        server.process.wait()
        server.process = None
        await asyncio.sleep(seconds)
        await asyncio.to_thread(server.start)
    elif kind == "loading":
        pad = sync_redis.Redis(port=server.port, db=1)
        with pad.pipeline(transaction=False) as pipe:
            for i in range(300_000):
                pipe.set(f"pad:{i}", "x")
            pipe.execute()
        pad.save()
        pad.close()
        server.process.kill()
        server.process.wait()
        server.process = None
        # Each key read waits (key-load-delay, in microseconds): the load takes about ``seconds``.
        delay = max(1, int(seconds * 1e6 / 300_000))
        server.extra = (*server.extra, "--key-load-delay", str(delay))
        await asyncio.to_thread(server.start, seconds + 30)
    elif kind == "pause":
        os.kill(server.process.pid, signal.SIGSTOP)
        await asyncio.sleep(seconds)
        os.kill(server.process.pid, signal.SIGCONT)
    elif kind == "readonly":
        copy = LocalRedis(rig.workdir / "copy")
        copy.workdir.mkdir()
        copy.start()
        admin, mirror = rig.admin(), sync_redis.Redis(port=copy.port)
        try:
            mirror.replicaof("127.0.0.1", server.port)
            await _until(lambda: mirror.info("replication").get("master_link_status") == "up", 20)
            mirror.replicaof("no", "one")
            admin.replicaof("127.0.0.1", copy.port)
            await asyncio.sleep(seconds)
            admin.replicaof("no", "one")
        finally:
            admin.close()
            mirror.close()
            copy.stop()
    elif kind == "oom":
        admin = rig.admin()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        await asyncio.sleep(seconds)
        admin.config_set("maxmemory", "0")
        admin.close()
    elif kind == "misconf":
        admin = rig.admin()
        doomed = rig.workdir / "snapshots"
        doomed.mkdir()
        admin.config_set("save", "3600 1")
        admin.config_set("dir", str(doomed))
        shutil.rmtree(doomed)
        admin.bgsave()
        await _until(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err", 10)
        await asyncio.sleep(seconds)
        doomed.mkdir()
        admin.config_set("dir", str(doomed))  # its working directory was the removed one
        admin.bgsave()
        await _until(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "ok", 10)
        admin.config_set("save", "")
        admin.close()
    elif kind == "noperm":
        admin = rig.admin()
        admin.execute_command("ACL", "SETUSER", ACL_USER, "-@write")
        await asyncio.sleep(seconds)
        admin.execute_command("ACL", "SETUSER", ACL_USER, "+@all")
        admin.close()
    elif kind == "busy":
        admin = rig.admin()
        admin.config_set("busy-reply-threshold", "100")
        looping = threading.Thread(target=_loop_script, args=(server.port,), daemon=True)
        looping.start()
        await _until(lambda: _answers_busy(server.port), 10)
        await asyncio.sleep(seconds)
        while looping.is_alive():
            with contextlib.suppress(sync_redis.ResponseError):
                admin.script_kill()
            await asyncio.sleep(0.05)
        admin.close()
    else:
        raise ValueError(f"unknown fault {kind!r}")


def _loop_script(port: int) -> None:
    client = sync_redis.Redis(port=port)
    with contextlib.suppress(sync_redis.ResponseError):  # killed: "Script killed by user"
        client.eval("local i = 0 while true do i = i + 1 end", 0)
    client.close()


def _answers_busy(port: int) -> bool:
    client = sync_redis.Redis(port=port, socket_timeout=1)
    try:
        client.ping()
        return False
    except sync_redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    finally:
        client.close()


async def measure(kind: str, seconds: float, *, tokens: int = 300, standby: bool = False) -> Figures:
    """One fault on a fresh stack, and what it cost."""
    if kind == "partition":
        standby = True
    figures = Figures(kind, seconds, standby)
    sentinel = kind in SENTINEL_KINDS
    rig = Rig(tokens, standby, acl=kind == "noperm", proxy=kind == "partition", sentinel=sentinel)
    async with rig:
        requester = Requester(rig.admin_url)
        requester.start()
        handshakes = len(rig.simulator.handshakes)
        conflated_before, dropped_before = await _counts(rig)
        restarts_before = await _restarts(rig)
        assert rig.consumer is not None
        rig.seen_before = dict(rig.consumer.seq)  # {ns}:last must come back no older than this
        if kind == "partition":
            await _partition(rig, seconds, figures)
        else:
            await _inject(rig, kind, seconds, figures)
            await _recovery(rig, figures)
        await requester.close()
        await _settle_requests(rig)
        figures.handshakes = len(rig.simulator.handshakes) - handshakes
        await _fresh_status(rig)
        conflated, dropped = await _counts(rig)
        figures.conflated, figures.dropped = conflated - conflated_before, dropped - dropped_before
        figures.answered_twice = await rig.answered_twice()
        figures.leaders = await rig.leaders()
        figures.task_restarts = await _restarts(rig) - restarts_before
        assert rig.consumer is not None
        figures.seq_gaps = rig.consumer.gaps
        figures.seq_gaps_reconnect = rig.consumer.gaps_reconnect
        figures.consumer_reconnects = rig.consumer.reconnects
        figures.repeats = rig.consumer.repeats
        _judge(rig, figures)
        if figures.problems:
            for process, name in zip(rig.publishers, ("first", "second"), strict=False):
                log = (rig.workdir / f"{name}.log").read_text(errors="replace").splitlines()
                tail = " | ".join(log[-15:])
                figures.problems.append(f"{name} publisher (pid {process.pid}) log tail: {tail}")
    return figures


async def _recovery(rig: Rig, figures: Figures, budget: float = RECOVERY_BUDGET) -> None:
    """How long until ticks, every token, the claims and a request come back; all of it
    within one ``budget``, so that a stack that does not recover says so in good time."""
    back = time.monotonic()
    deadline = back + budget

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    assert rig.consumer is not None
    control = ControlClient(rig.rds, NS)
    asking = control.subscribe([token(80_000)], mode="ltp", client="probe", timeout=budget)
    probe = asyncio.create_task(asking)
    try:
        figures.first_tick_s = await _until(lambda: rig.consumer.last_at > back, left())
        at = rig.consumer.token_at
        figures.all_ticking_s = figures.first_tick_s + await _until(
            lambda: all(at.get(t, 0) > back for t in rig.tokens), left()
        )
        figures.claims_back_s = await _until(rig.claims_back, left())
    except TimeoutError as exc:
        figures.problems.append(f"not recovered: {exc}")
    try:
        await asyncio.wait_for(probe, left())
        figures.request_answered_s = time.monotonic() - back
    except (TimeoutError, *bus.REDIS_FAULTS) as exc:
        figures.problems.append(f"request not answered: {exc!r}")
    rig.expected["probe"] = {token(80_000): "ltp"}


async def _partition(rig: Rig, seconds: float, figures: Figures) -> None:
    """Cut the leader off; the standby must lead, with Kite's sockets, within ttl + 2 s."""
    assert rig.proxy is not None
    old = await rig._leader_pid()
    wanted = rig.at_kite()
    cut = time.monotonic()
    rig.proxy.cut()
    try:
        await _until(lambda: _leads_other(rig, old), 30)
        await _until(lambda: rig.at_kite() == wanted and len(rig.simulator.sessions) == 3, 30)
        figures.takeover_s = time.monotonic() - cut
    except TimeoutError as exc:
        figures.problems.append(f"no takeover: {exc}")
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - cut)))
    rig.proxy.heal()
    await _recovery(rig, figures)


async def _leads_other(rig: Rig, old: int | None) -> bool:
    pid = await rig._leader_pid()
    return pid is not None and pid != old


async def _fresh_status(rig: Rig) -> None:
    """Wait for a status written from now on: the counters of the recovery itself."""
    now = time.time()

    async def written() -> bool:
        return float(await rig.rds.hget(rig.keys.status, "heartbeat_at") or 0) > now

    with contextlib.suppress(TimeoutError):
        await _until(written, 10)


async def _counts(rig: Rig) -> tuple[int, int]:
    """``conflated`` and ``dropped`` of the leader's status (the sum over publishers is not
    kept: a takeover starts them again)."""
    conflated, dropped = await rig.rds.hmget(rig.keys.status, ["conflated", "dropped"])
    return int(conflated or 0), int(dropped or 0)


async def _restarts(rig: Rig) -> int:
    """``task_restarts`` of the leader's status (a takeover starts it again at 0)."""
    return int(await rig.rds.hget(rig.keys.status, "task_restarts") or 0)


async def _settle_requests(rig: Rig) -> None:
    """Every request written is answered (the control stream drained)."""
    with contextlib.suppress(TimeoutError):
        await _until(lambda: _drained(rig), 30)


async def _drained(rig: Rig) -> bool:
    groups = await rig.rds.xinfo_groups(rig.keys.control)
    newest = await rig.rds.xrevrange(rig.keys.control, count=1)
    # ``lag`` is off after a replica's promotion: the last delivered id tells what is unread
    read = not newest or all(g["last-delivered-id"] == newest[0][0] for g in groups)
    return all(g["pending"] == 0 and (g.get("lag", 0) in (0, None) or read) for g in groups)


def _judge(rig: Rig, figures: Figures) -> None:
    problems = figures.problems
    if figures.answered_twice:
        problems.append(f"{figures.answered_twice} requests answered twice")
    if figures.task_restarts > 0:  # a fault of Redis is waited out, never a task's end
        problems.append(f"{figures.task_restarts} long-lived tasks ended and were restarted")
    if figures.leaders != 1:
        problems.append(f"{figures.leaders} publishers lead at the end")
    if not figures.standby and figures.handshakes:
        problems.append(f"Kite saw {figures.handshakes} handshakes although only Redis failed")
    if figures.seq_gaps and not (figures.conflated or figures.dropped):
        problems.append(f"{figures.seq_gaps} seq gaps in what the publisher sent, none counted as given up")
    if figures.fault == "partition" and rig.consumer is not None and rig.consumer.stale_epoch_after_new:
        problems.append(f"{rig.consumer.stale_epoch_after_new} ticks of the old leader after the new one's")


# --- the command -------------------------------------------------------------------------


def _row(f: Figures) -> str:
    def s(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    cells = (
        f"{f.fault}:{f.seconds:g}", "yes" if f.standby else "no", s(f.first_tick_s), s(f.all_ticking_s),
        s(f.claims_back_s),
        s(f.request_answered_s), s(f.takeover_s), s(f.named_s), f.conflated, f.dropped, f.answered_twice,
        f.handshakes, f"{f.seq_gaps} / {f.seq_gaps_reconnect} ({f.consumer_reconnects})", f.repeats,
        f.task_restarts, "ok" if f.ok else "FAILED",
    )  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--faults", default="restart:3,restart:10,restart:60,pause:3,pause:10,pause:60,readonly:4,oom:5,"
        "misconf:5,noperm:5,busy:4,loading:4,partition:8,sentinel_failover:0,primary_killed:0",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--standby", action="store_true", help="run a standby beside the leader")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    print("| fault | standby | first tick s | every token ticks s | claims back s | request answered s "
          "| takeover s | named s | conflated | dropped | answered twice | Kite handshakes "
          "| seq gaps: publisher / consumer reconnect (reconnects) | ticks again | task restarts "
          "| |")  # fmt: skip
    print("|---" * 16 + "|")
    for item in args.faults.split(","):
        kind, _, seconds = item.partition(":")
        figures = await measure(kind, float(seconds or 5), tokens=args.tokens, standby=args.standby)
        results.append(figures)
        print(_row(figures), flush=True)
        for problem in figures.problems:
            print(f"  - {problem}", flush=True)
    if args.json:
        print(json.dumps([asdict(f) for f in results], indent=2))
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
