"""The Redis behind the bus: one server, a primary found through Redis Sentinel
(``REDIS_URL=redis+sentinel://...``), or a Redis Cluster (``KITEBUS_REDIS_CLUSTER=1``).

Everything that differs between the two lives here, so no other module asks which it is:

- ``connect`` gives a redis-py client (``RedisCluster`` follows MOVED and ASK by itself);
- ``pipeline`` is one MULTI/EXEC on a server; on a cluster the contract's keys sit in
  different slots, so it is a plain pipeline, split per node, in order per key;
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
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import hiredis
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, ResponseError, SlotNotCoveredError, TryAgainError

from config.redisurl import SentinelURL, is_sentinel_url, parse_sentinel_url
from publisher.resp import RespConnection, RespError, pack_command

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
            connection.write(pack_command(b"CLUSTER", b"SLOTS"))
            await connection.drain()
            parser = hiredis.Reader()
            while (reply := parser.gets()) is False:
                parser.feed(await connection.read())
        finally:
            await connection.close()
        if isinstance(reply, hiredis.ReplyError):
            raise RespError(f"CLUSTER SLOTS failed: {reply} (is it a cluster node?)")
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


class OrderedWrites:
    """Writes queued in ``stages``, applied in that order: one MULTI/EXEC for all of them on
    one server; on a cluster, where keys of different slots cannot share a transaction, each
    stage is a pipeline sent once the stage before it has been answered. A failure part way
    then leaves the earlier stages applied, never a later one without them."""

    def __init__(self, client: Client, stages: int) -> None:
        if is_cluster(client):
            self.stages = [client.pipeline(transaction=False) for _ in range(stages)]
        else:
            self.stages = [client.pipeline(transaction=True)] * stages

    async def execute(self) -> None:
        done: list[Any] = []
        try:
            for pipe in self.stages:
                if not any(pipe is other for other in done):
                    done.append(pipe)
                    if len(pipe):
                        await pipe.execute()
        finally:
            for pipe in self.stages:
                await pipe.reset()


async def run_id(client: Client) -> str:
    """Changes whenever Redis (on a cluster: any node) restarted, so lost data is noticed."""
    if not is_cluster(client):
        return str((await client.info("server"))["run_id"])
    replies = await client.info("server", target_nodes=RedisCluster.ALL_NODES)
    return ",".join(sorted(str(reply["run_id"]) for reply in replies.values()))
