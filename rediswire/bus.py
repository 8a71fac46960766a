"""The Redis behind the bus: one server, a primary found through Redis Sentinel
(``REDIS_URL=redis+sentinel://...``), or a Redis Cluster (``KITEBUS_REDIS_CLUSTER=1``).

Everything that differs between the two lives here, so no other module asks which it is:

- ``connect`` gives a redis-py client (``RedisCluster`` follows MOVED and ASK by itself);
- ``pipeline`` is one MULTI/EXEC on a server; on a cluster the contract's keys sit in
  different slots, so it is a plain pipeline, split per node, in order per key;
- ``OrderedWrites``: the leader's state writes, in stages, fenced by its lease: one
  script on a server, which applies them only while ``{ns}:leader`` is ours; on a cluster
  one per slot, which applies its part only if no higher fence wrote to that slot;
- ``PUBLISH`` or ``SPUBLISH`` (sharded pub/sub, Redis >= 7) and the matching subscribe;
- ``Topology``: which master serves the slot of a channel or key, for the RESP sockets of
  the tick flow and of the library's pub/sub reader, which redis-py does not carry;
- Sentinel: ``connect`` gives a client whose pool asks the sentinels who is primary on each
  new connection and, at most every ``FOLLOW_INTERVAL`` seconds, before handing one out, so
  it moves to a new primary within that much of a failover (a demoted primary goes on
  taking writes for seconds until Sentinel reconfigures it). The RESP sockets resolve the
  primary on each (re)open (``topology``) and watch for a new one (``primary_moved``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from config.keys import Keys
from config.redisurl import SentinelURL, is_sentinel_url, parse_sentinel_url
from rediswire import resp
from rediswire.connection import RespConnection
from rediswire.resp import RespError

Client = redis.Redis | RedisCluster
Pipeline = Any  # redis-py's Pipeline or ClusterPipeline: the same queuing methods
SLOTS = 16384
# Redis is away for now: retry later. On a cluster that includes a resharding slot
# (TRYAGAIN) and a cluster that lost a master (CLUSTERDOWN, a slot nobody serves).
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, OSError, ClusterDownError, TryAgainError, SlotNotCoveredError,
)  # fmt: skip
# Redis away, or saying no for now: OOM (maxmemory with noeviction), READONLY (a demoted
# primary), MISCONF (a failed snapshot stops writes), NOPERM (an ACL change), LOADING, BUSY
# (a long script), or any other error reply. The publisher's background writes retry these
# with a backoff and report them (``describe``); none of them ends a task.
REDIS_FAULTS: tuple[type[BaseException], ...] = (*REDIS_DOWN, ResponseError)


MIN_VERSION = (7, 0)  # the fenced writes' scripts are marked ``#!lua``, which Redis 7 runs


class RedisTooOld(RuntimeError):
    """The server is older than ``MIN_VERSION``."""


def version_of(info: dict[str, Any]) -> tuple[int, ...]:
    """The oldest ``redis_version`` in an ``INFO server`` reply (a cluster's: one per node)."""
    replies = [info] if "redis_version" in info else [v for v in info.values() if isinstance(v, dict)]
    versions = [tuple(int(p) for p in str(r["redis_version"]).split(".")[:2]) for r in replies]
    return min(versions) if versions else (0,)


async def require_version(client: Client) -> None:
    """Raise ``RedisTooOld`` naming the version when the server (any node) is older than
    ``MIN_VERSION``; Redis away or saying no here is left to the writes that follow."""
    try:
        info = await client.info("server")
    except REDIS_FAULTS:
        return
    found = version_of(info)
    if found < MIN_VERSION:
        have, need = ".".join(map(str, found)), ".".join(map(str, MIN_VERSION))
        raise RedisTooOld(f"Redis {have} is too old: kitebus needs Redis {need} or later")


def describe(exc: BaseException) -> str:
    """A short reason for a Redis fault, for logs and ``{ns}:status``: the error reply's
    text (Redis never quotes a password in one), else the exception's class."""
    if isinstance(exc, ResponseError):
        return f"redis said: {str(exc)[:120]}"
    return f"redis unreachable: {exc.__class__.__name__}"


def cluster_from_env() -> bool:
    """``KITEBUS_REDIS_CLUSTER`` from the environment (for library users without Settings)."""
    return os.environ.get("KITEBUS_REDIS_CLUSTER", "").strip().lower() in ("1", "true", "yes", "on")


def connect(url: str, cluster: bool | None = None, **kwargs: Any) -> Client:
    """A client for ``url``; ``cluster=None`` reads ``KITEBUS_REDIS_CLUSTER``. A
    ``redis+sentinel://`` URL gives a client of the service's primary, wherever it is."""
    if is_sentinel_url(url):
        if cluster:
            raise ValueError("a redis+sentinel:// URL does not go with KITEBUS_REDIS_CLUSTER=1")
        return _sentinel_client(url, **kwargs)
    if cluster is None:
        cluster = cluster_from_env()
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.from_url(url, **kwargs)


FOLLOW_INTERVAL = 0.5  # seconds: how often a connection's user asks who is primary now


class FollowingPool(SentinelConnectionPool):
    """redis-py's Sentinel pool that also follows a failover on its own: before handing
    out a connection it asks the sentinels (at most every ``FOLLOW_INTERVAL`` s) who is
    primary, and a connection still open to another server is reopened. redis-py alone
    moves only when the old primary answers READONLY or drops the connection."""

    def __init__(self, url: str, target: SentinelURL, manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(target.service, manager, **kwargs)
        self.url = url
        self.target = target
        self._asked = 0.0
        self.moves = 0  # how often the primary changed under this pool

    async def get_master_address(self) -> Any:
        before = self.master_address
        address = await super().get_master_address()
        if before is not None and address != before:
            self.moves += 1
        return address

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        if self.master_address is not None and time.monotonic() - self._asked >= FOLLOW_INTERVAL:
            self._asked = time.monotonic()
            try:
                await self.get_master_address()  # a new one: idle connections are closed
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # no sentinel answers, or none names a primary: stay where we are
        connection = await super().get_connection(*args, **options)
        if self.master_address is not None and (connection.host, connection.port) != self.master_address:
            try:  # busy when the primary changed: open it again, to the new one
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client is closing: so are its sentinel connections
            await self.sentinel_manager.aclose()


def _sentinel_client(url: str, **kwargs: Any) -> redis.Redis:
    target = parse_sentinel_url(url)
    asking = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    asking.setdefault("socket_timeout", 2.0)
    asking.setdefault("socket_connect_timeout", 2.0)
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=asking)
    # What redis.from_url gives its pool, which a pool made here would go without: a
    # command (and the connect before it) retried on a connection error, for ~4 s.
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), 10))
    pool = FollowingPool(
        url, target, manager, db=target.db, username=target.username, password=target.password, **kwargs
    )
    return redis.Redis.from_pool(pool)


def primary_moves(client: Client) -> int:
    """How often the client's primary changed (Sentinel); 0 for anything else. Whoever
    relies on writes being acknowledged by the server in hand (the control loop's XACKs)
    looks again when this changes: the old primary's last writes may not have reached
    the new one."""
    pool = getattr(client, "connection_pool", None)
    return pool.moves if isinstance(pool, FollowingPool) else 0


def is_sentinel(client: Client) -> bool:
    return isinstance(getattr(client, "connection_pool", None), FollowingPool)


async def primary_address(url: str | SentinelURL, timeout: float = 1.0) -> tuple[str, int]:
    """``SENTINEL GET-MASTER-ADDR-BY-NAME`` asked of each sentinel in turn, until one names
    the primary. Raises RespError (a ConnectionError) when none does."""
    target = parse_sentinel_url(url) if isinstance(url, str) else url
    problems = []
    for host, port in target.sentinels:
        try:
            connection = await RespConnection.open(f"redis://{host}:{port}/0", timeout)
            try:
                async with asyncio.timeout(timeout):
                    reply = await connection.call(b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", target.service)
            finally:
                await connection.close()
        except (ConnectionError, OSError, TimeoutError) as exc:
            problems.append(f"{host}:{port} {exc.__class__.__name__}")
            continue
        if isinstance(reply, list) and len(reply) == 2:
            return reply[0].decode(), int(reply[1])
        problems.append(f"{host}:{port} {'said ' + str(reply) if reply else 'knows no such service'}")
    raise RespError(f"no sentinel names a primary for {target.service!r}: {'; '.join(problems)}")


async def primary_moved(url: str, node: str, interval: float = FOLLOW_INTERVAL) -> str:
    """Returns (why) once the sentinels of ``url`` name another primary than ``node`` (a
    ``redis://`` URL); waits for ever while they name it, or none answers."""
    parts = urlsplit(node)
    here = (parts.hostname, parts.port)
    while True:
        await asyncio.sleep(interval)
        try:
            host, port = await primary_address(url)
        except RespError:
            continue
        if (host, port) != here:
            return f"sentinel names {host}:{port} primary"


async def describe_server(client: Client) -> str:
    """Which server the client writes to, for ``kitebus status``: ``primary H:P via sentinel
    service S``, ``H:P`` of a server, or the cluster's masters."""
    if is_cluster(client):
        masters = sorted(f"{n.host}:{n.port}" for n in client.get_primaries())
        return f"cluster masters {', '.join(masters)}"
    pool = client.connection_pool
    if isinstance(pool, FollowingPool):
        host, port = await pool.get_master_address()
        return f"primary {host}:{port} via sentinel service {pool.service_name}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def pipeline(client: Client) -> Any:
    """Writes sent together: atomic on one server; on a cluster, in order for each key
    (each node gets its commands in the order they were queued), not atomic across keys."""
    return client.pipeline(transaction=not is_cluster(client))


def publish_command(cluster: bool) -> bytes:
    return b"SPUBLISH" if cluster else b"PUBLISH"


def seed_url(client: Client) -> str:
    """A URL of a node of a cluster client (credentials kept), for the RESP sockets."""
    node = client.get_default_node() or next(iter(client.nodes_manager.startup_nodes.values()))
    kwargs = node.connection_kwargs
    auth = ""
    if kwargs.get("password"):
        auth = f"{quote(kwargs.get('username') or 'default')}:{quote(kwargs['password'])}@"
    scheme = "rediss" if kwargs.get("ssl") or "ssl_context" in kwargs else "redis"
    return f"{scheme}://{auth}{node.host}:{node.port}/0"


def node_url(seed: str, host: str, port: int) -> str:
    """``seed`` with its host and port replaced: same scheme and credentials."""
    parts = urlsplit(seed)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, "/0", "", ""))


@dataclass(frozen=True)
class Topology:
    """Which master serves each slot: ``nodes`` are their URLs, ``owner[slot]`` an index
    into them (-1 for a slot nobody serves). One server is one node that serves all."""

    nodes: tuple[str, ...]
    owner: tuple[int, ...] | None  # None: not a cluster

    @classmethod
    def single(cls, url: str) -> Topology:
        return cls((url,), None)

    @classmethod
    async def fetch(cls, seed: str) -> Topology:
        """``CLUSTER SLOTS`` asked of the node ``seed`` names. Raises RespError."""
        connection = await RespConnection.open(seed)
        try:
            reply = await connection.call(b"CLUSTER", b"SLOTS")
        finally:
            await connection.close()
        if resp.is_error(reply):
            raise RespError(f"CLUSTER SLOTS failed: {reply} (is it a cluster node?)")
        if not isinstance(reply, list):
            raise RespError(f"CLUSTER SLOTS gave {reply!r}, not a list of slot ranges")
        nodes: list[str] = []
        owner = [-1] * SLOTS
        for start, end, master, *_replicas in reply:
            url = node_url(seed, (master[0] or b"127.0.0.1").decode(), int(master[1]))
            if url not in nodes:
                nodes.append(url)
            owner[start : end + 1] = [nodes.index(url)] * (end + 1 - start)
        if not nodes:
            raise RespError("the cluster serves no slot")
        return cls(tuple(nodes), tuple(owner))

    @property
    def cluster(self) -> bool:
        return self.owner is not None

    def node_of(self, name: bytes) -> int:
        """The index of the node that serves ``name`` (a key or a shard channel)."""
        if self.owner is None:
            return 0
        node = self.owner[key_slot(name)]
        if node < 0:
            raise RespError(f"no node serves the slot of {name[:60]!r} (CLUSTERDOWN)")
        return node


async def topology(url: str, cluster: bool) -> Topology:
    """Where the RESP sockets go: a cluster's masters, the primary the sentinels name now
    (raises RespError when none does), or the one server."""
    if cluster:
        return await Topology.fetch(url)
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        return Topology.single(target.node_url(*await primary_address(target)))
    return Topology.single(url)


# --- fenced writes: the leader's state, refused by Redis from a deposed one ------------

CHUNK = 1000  # words per queued command at most: a script unpacks each onto Lua's stack (< 8000)

# The queued commands, each as its number of words and its words, after the script's own
# ARGV[1]. A command that fails stops the script with the ones before it applied, as a
# failure part way through a batch on a cluster; "#!lua" (Redis 7) has Redis refuse the
# whole script up front for what would refuse its first write (OOM, READONLY, MISCONF).
_APPLY = """
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""
# One server (or Sentinel's primary): nothing is written unless the lease KEYS[1] holds
# ARGV[1], our ``<fence>:<host>:<pid>``. A lease that is gone (Redis lost its data) is no
# deposition: the leader takes it back at its next renewal, and writes wait for that.
_LEASE_SCRIPT = """#!lua
local holder = redis.call('get', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return redis.error_reply('DEPOSED ' .. holder .. ' holds the lease') end
  return redis.error_reply('NOLEASE the lease is gone (redis lost it?): writes wait for its renewal')
end
""" + _APPLY
# A cluster, where one script reaches one slot: KEYS[1] holds the highest fence that wrote
# to this slot (KEYS[2..] are the keys written, all of that slot); a lower fence writes
# nothing, a higher one raises it.
_SLOT_SCRIPT = """#!lua
local seen = tonumber(redis.call('get', KEYS[1]) or '0')
local ours = tonumber(ARGV[1])
if seen > ours then
  return redis.error_reply('DEPOSED ' .. seen .. ' wrote to this slot after our fence ' .. ours)
end
if seen < ours then redis.call('set', KEYS[1], ARGV[1]) end
""" + _APPLY


@dataclass(frozen=True)
class _Script:
    body: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.body.encode()).hexdigest()


LEASE_SCRIPT, SLOT_SCRIPT = _Script(_LEASE_SCRIPT), _Script(_SLOT_SCRIPT)


class Deposed(ResponseError):
    """Redis refused a fenced write: another publisher leads (or led after us). A
    ResponseError, so every writer that waits out Redis saying no waits this out too,
    while the lease (told by ``Fenced.depose``) ends the term."""


@dataclass(frozen=True)
class Guard:
    """What Redis checks before it applies the leader's writes: the lease ``keys.leader``
    holds ``value``; on a cluster, no fence above ``fence`` wrote to the slot."""

    keys: Keys
    value: str
    fence: int


class Fenced(Protocol):
    """Who writes under a lease (``lease.Fence``): the guard to check, if any, and what to
    do when Redis says the lease is another's."""

    def guard(self) -> Guard | None: ...

    async def depose(self, why: str, seen: int | None = None) -> None: ...

    def renew_soon(self) -> None: ...


class Writes:
    """Commands queued for one stage of ``OrderedWrites``: the few the publisher's state
    writes use, called as redis-py's are. Each is on one key (a cluster groups them by
    slot); a long one is cut into several of at most ``CHUNK`` words."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.stamped: list[str] = []  # keys whose slots the fence claims though nothing writes them

    def __len__(self) -> int:
        return len(self.commands)

    def _add(self, head: tuple[Any, ...], words: Sequence[Any], step: int = 1) -> None:
        per = CHUNK - CHUNK % step
        for start in range(0, len(words), per):
            self.commands.append((*head, *words[start : start + per]))

    def hset(
        self, name: str, key: Any = None, value: Any = None, mapping: Mapping[Any, Any] | None = None
    ) -> None:
        words = [] if key is None else [key, value]
        for pair in (mapping or {}).items():
            words.extend(pair)
        self._add(("HSET", name), words, 2)

    def hdel(self, name: str, *keys: Any) -> None:
        self._add(("HDEL", name), keys)

    def sadd(self, name: str, *values: Any) -> None:
        self._add(("SADD", name), values)

    def srem(self, name: str, *values: Any) -> None:
        self._add(("SREM", name), values)

    def delete(self, *names: str) -> None:
        for name in names:
            self.commands.append(("DEL", name))

    def xadd(
        self, name: str, fields: Mapping[Any, Any], maxlen: int | None = None, approximate: bool = True
    ) -> None:
        trim = ("MAXLEN", "~" if approximate else "=", maxlen) if maxlen is not None else ()
        self.commands.append(("XADD", name, *trim, "*", *(w for pair in fields.items() for w in pair)))

    def xack(self, name: str, group: str, *ids: Any) -> None:
        self._add(("XACK", name, group), ids)

    def publish(self, channel: str, message: Any, *, sharded: bool = False) -> None:
        """PUBLISH, or SPUBLISH (``sharded``, on a cluster: in the slot of ``channel``)."""
        self.commands.append((publish_command(sharded).decode(), channel, message))

    def stamp(self, *keys: str) -> None:
        """Nothing to write to ``keys`` now, but on a cluster their slots are claimed by our
        fence (a new leader does so at start, before a deposed one's writes could land)."""
        self.stamped.extend(keys)

    async def reset(self) -> None:
        self.commands.clear()
        self.stamped.clear()


class OrderedWrites:
    """Writes queued in ``stages``, applied in that order. Without a lease: one MULTI/EXEC
    for all of them on one server; on a cluster, where keys of different slots cannot share
    a transaction, each stage is a pipeline sent once the stage before it has been
    answered, so a failure part way leaves the earlier stages applied, never a later one
    without them. Under a lease (``fence`` with a guard) the writes are fenced: one script
    on one server, which applies them all only while the lease is ours; on a cluster one
    script per slot and stage, which applies its part only if no higher fence wrote there.
    A refusal tells the fence (``depose``) and raises ``Deposed``."""

    def __init__(self, client: Client, stages: int, fence: Fenced | None = None) -> None:
        self._client = client
        self._fence = fence
        self.stages = [Writes() for _ in range(stages)]

    def __len__(self) -> int:
        return sum(map(len, self.stages))

    async def execute(self) -> None:
        fence = self._fence
        try:
            guard = fence.guard() if fence is not None else None
            if fence is None or guard is None:
                await self._unfenced()
            elif is_cluster(self._client):
                for stage in self.stages:
                    await self._fenced_by_slot(stage, guard, fence)
            elif len(self):
                words = [w for stage in self.stages for cmd in stage.commands for w in (len(cmd), *cmd)]
                await self._run(LEASE_SCRIPT, [([guard.keys.leader], [guard.value, *words])], fence)
        finally:
            for stage in self.stages:
                await stage.reset()

    async def _unfenced(self) -> None:
        cluster = is_cluster(self._client)
        every = [command for stage in self.stages for command in stage.commands]
        groups = [stage.commands for stage in self.stages] if cluster else [every]
        for commands in groups:
            if commands:
                async with self._client.pipeline(transaction=not cluster) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    await pipe.execute()

    async def _fenced_by_slot(self, stage: Writes, guard: Guard, fence: Fenced) -> None:
        slots: dict[int, tuple[dict[Any, None], list[Any]]] = {}
        for key in stage.stamped:
            slots.setdefault(key_slot(_encoded(key)), ({}, []))[0][key] = None
        for command in stage.commands:
            keys, words = slots.setdefault(key_slot(_encoded(command[1])), ({}, []))
            keys[command[1]] = None
            words += (len(command), *command)
        calls = [
            ([guard.keys.slot_fence(slot_tag(slot)), *keys], [guard.fence, *words])
            for slot, (keys, words) in slots.items()
        ]  # fmt: skip
        if calls:
            await self._run(SLOT_SCRIPT, calls, fence)

    async def _run(self, script: _Script, calls: list[tuple[list[Any], list[Any]]], fence: Fenced) -> None:
        """Each call (keys, args) of ``script``, pipelined; a refusal is the fence's to hear."""
        replies = await _evalsha(self._client, script, calls)
        for reply in replies:
            if isinstance(reply, ResponseError) and str(reply).startswith("DEPOSED"):
                why = f"redis refused a write: {reply}"
                holder = str(reply).split()[1].partition(":")[0]
                await fence.depose(why, int(holder) if holder.isdigit() else None)
                raise Deposed(why)
        for reply in replies:
            if isinstance(reply, ResponseError) and str(reply).startswith("NOLEASE"):
                fence.renew_soon()
            if isinstance(reply, BaseException):
                raise reply


class FencedPipeline(Writes):
    """One stage of ``OrderedWrites`` in the shape of redis-py's pipeline: ``async with
    fenced(client, fence) as pipe:``, queue, ``await pipe.execute()``."""

    def __init__(self, client: Client, fence: Fenced | None) -> None:
        super().__init__()
        self._writes = OrderedWrites(client, 1, fence)
        self._writes.stages[0] = self

    async def execute(self) -> None:
        await self._writes.execute()

    async def __aenter__(self) -> FencedPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reset()


def fenced(client: Client, fence: Fenced | None) -> FencedPipeline:
    """Writes sent together, fenced by ``fence`` as ``OrderedWrites`` does (without a
    lease: one MULTI/EXEC on a server, a pipeline on a cluster)."""
    return FencedPipeline(client, fence)


async def write(client: Client, fence: Fenced | None, queue: Callable[[Writes], object]) -> None:
    """The writes ``queue`` puts on a ``fenced`` pipeline, sent."""
    async with fenced(client, fence) as pipe:
        queue(pipe)
        await pipe.execute()


async def _evalsha(client: Client, script: _Script, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    """Replies (or errors) of ``script`` for each call; where the server does not have the
    script yet (NOSCRIPT: nothing ran), it is sent again whole."""
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = await pipe.execute(raise_on_error=False)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        async with client.pipeline(transaction=False) as pipe:
            for i in missing:
                keys, args = calls[i]
                pipe.eval(script.body, len(keys), *keys, *args)
            for i, reply in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
    return replies


def _encoded(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each slot the smallest number whose name hashes to it (0.1 s, once)."""
    tags = [""] * SLOTS
    left, n = SLOTS, 0
    while left:
        slot = key_slot(b"%d" % n)
        if not tags[slot]:
            tags[slot] = str(n)
            left -= 1
        n += 1
    return tuple(tags)


def slot_tag(slot: int) -> str:
    """A hash tag that puts a key in ``slot`` (for the per-slot fence of a cluster)."""
    return _slot_tags()[slot]


async def run_id(client: Client) -> str:
    """Changes whenever Redis (on a cluster: any node) restarted, so lost data is noticed."""
    if not is_cluster(client):
        return str((await client.info("server"))["run_id"])
    replies = await client.info("server", target_nodes=RedisCluster.ALL_NODES)
    return ",".join(sorted(str(reply["run_id"]) for reply in replies.values()))
