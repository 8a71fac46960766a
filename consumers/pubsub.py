"""A pub/sub connection read with hiredis, messages handed over in batches.

redis-py's ``PubSub.get_message`` costs about 20 us a message in Python: a consumer of
every instrument then cannot keep up with a busy feed and is cut by Redis. This reads
whatever the socket has, parses it in C (hiredis) and hands the messages over as a list.

On a Redis Cluster (``KITEBUS_REDIS_CLUSTER=1``) ticks are published with SPUBLISH and
read with SSUBSCRIBE at the master that serves each channel's slot: ``ShardedPubSub``
holds one such reader per master and reads them as one. When a slot moves, Redis
unsubscribes its channels (an ``sunsubscribe`` nobody asked for): the reader then fails
like a dropped connection, and its owner reconnects with a fresh map of the slots.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

import redis.asyncio as redis

from config.redisurl import is_sentinel_url
from rediswire import bus, resp
from rediswire.connection import RespConnection
from rediswire.resp import RespError
from rediswire.tasks import cancel_and_wait

Message = tuple[bytes, bytes]  # (channel, data)
SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE command
# hiredis moves what is left of its buffer down every 1 KB it parses: fed 1 MB at once it
# costs ~5 us a tick message, fed 16 KB at a time ~0.3 us
FEED_SIZE = 16 << 10


def url_of(client: bus.Client) -> str:
    """The URL a redis-py client connects to (host or unix socket, credentials, db, TLS);
    for a cluster client, the URL of one of its nodes; with Sentinel, its sentinel URL."""
    if bus.is_cluster(client):
        return bus.seed_url(client)
    if isinstance(client.connection_pool, bus.FollowingPool):
        return client.connection_pool.url
    kwargs = client.connection_pool.connection_kwargs
    auth = ""
    if kwargs.get("password"):
        auth = f"{quote(kwargs.get('username') or 'default')}:{quote(kwargs['password'])}@"
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


class FastPubSub:
    """SUBSCRIBE/UNSUBSCRIBE and batched message reads on a connection of its own.

    One owned task reads the socket and parses what arrives; ``read`` hands over the
    messages. Past ``max_unread`` messages not yet handed over, the task stops reading,
    so a slow consumer's backlog stays in Redis, which cuts it at its output-buffer
    limit. ``read`` then raises ``RespError`` (a ConnectionError).
    """

    def __init__(
        self,
        connection: RespConnection,
        max_unread: int = 10_000,
        *,
        sharded: bool = False,
        arrived: asyncio.Event | None = None,
        moved: Coroutine[Any, Any, str] | None = None,
    ) -> None:
        """``sharded``: SSUBSCRIBE (a cluster node); ``arrived``: an event shared with other
        readers, set when messages arrive; ``moved``: returns when this server is no longer
        the primary (Sentinel), and the reader then fails as if cut off."""
        self._connection = connection
        self._replies = resp.Replies()
        self._ready: deque[Message] = deque()
        self._sharded = sharded
        self._message = b"smessage" if sharded else b"message"
        self._arrived = arrived or asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._awaiting: set[tuple[bytes, bytes]] = set()  # (confirmation, channel) not yet seen
        self._confirmed = asyncio.Event()
        self._failure: ConnectionError | None = None
        self.max_unread = max_unread
        self._task = asyncio.create_task(self._pump(), name="pubsub-reader")
        self._follow = asyncio.create_task(self._moved(moved), name="pubsub-follow") if moved else None

    @classmethod
    async def open(cls, url: str, max_unread: int = 10_000) -> FastPubSub:
        """A reader at ``url``; with a ``redis+sentinel://`` URL, at the primary the sentinels
        name, failing (so that its owner reconnects) once they name another."""
        if not is_sentinel_url(url):
            return cls(await RespConnection.open(url), max_unread)
        node = (await bus.topology(url, False)).nodes[0]
        return cls(await RespConnection.open(node), max_unread, moved=bus.primary_moved(url, node))

    async def _moved(self, moved: Coroutine[Any, Any, str]) -> None:
        why = await moved
        if self._failure is None:
            self._failure = RespError(f"the primary moved ({why})")
        await cancel_and_wait(self._task)
        self._arrived.set()
        self._confirmed.set()

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and wait until Redis confirmed every channel (so that a snapshot read
        afterwards can miss nothing)."""
        if self._sharded:
            await self._command(b"SSUBSCRIBE", b"ssubscribe", channels)
        else:
            await self._command(b"SUBSCRIBE", b"subscribe", channels)

    async def unsubscribe(self, *channels: str) -> None:
        if self._sharded:
            await self._command(b"SUNSUBSCRIBE", b"sunsubscribe", channels)
        else:
            await self._command(b"UNSUBSCRIBE", b"unsubscribe", channels)

    async def _command(self, command: bytes, confirmation: bytes, channels: tuple[str, ...]) -> None:
        names = sorted({c.encode() for c in channels})
        expected = {(confirmation, name) for name in names}
        self._awaiting |= expected
        batch = 1 if self._sharded else SUBSCRIBE_BATCH  # one slot per SSUBSCRIBE
        for start in range(0, len(names), batch):
            self._connection.write(resp.command(command, *names[start : start + batch]))
        await self._connection.drain()
        while expected & self._awaiting:
            if self._failure is not None:
                raise self._failure
            self._confirmed.clear()
            await self._confirmed.wait()

    async def read(self, timeout: float) -> list[Message]:
        """The messages that are there, or that arrive within ``timeout`` seconds."""
        if not self._ready:
            if self._failure is not None:
                raise self._failure
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
        return self.take()

    def take(self) -> list[Message]:
        """The messages that are there now; raises the reader's failure once none are left."""
        if not self._ready:
            if self._failure is not None:
                raise self._failure
            return []
        out = list(self._ready)
        self._ready.clear()
        self._room.set()
        return out

    async def _pump(self) -> None:
        try:
            while True:
                await self._room.wait()
                self._parse(await self._connection.read())
                if len(self._ready) >= self.max_unread:
                    self._room.clear()
        except ConnectionError as exc:
            self._failure = exc
        except OSError as exc:
            self._failure = RespError(f"pub/sub connection failed: {exc.__class__.__name__}")
        self._arrived.set()
        self._confirmed.set()

    def _parse(self, data: bytes) -> None:
        replies, gets, ready, message = self._replies, self._replies.gets, self._ready, self._message
        arrived = confirmed = False
        view = memoryview(data)
        for start in range(0, len(data), FEED_SIZE):
            replies.feed(view[start : start + FEED_SIZE])
            while (reply := gets()) is not False:
                if type(reply) is list and reply[0] == message:
                    ready.append((reply[1], reply[2]))
                    arrived = True
                else:
                    confirmed |= self._other(reply)
        if arrived:
            self._arrived.set()
        if confirmed:
            self._confirmed.set()

    def _other(self, reply: Any) -> bool:
        """A reply that is no message: whether it confirmed a (un)subscription awaited; raises
        on an error reply or a slot moved away."""
        if resp.is_error(reply):
            raise RespError(f"Redis refused a pub/sub command: {reply}")
        if (reply[0], reply[1]) in self._awaiting:
            self._awaiting.discard((reply[0], reply[1]))
            return True
        if reply[0] == b"sunsubscribe":
            raise RespError(f"the slot of {reply[1][:60]!r} moved to another node")
        return False

    async def close(self) -> None:
        if self._follow is not None:
            await cancel_and_wait(self._follow)
        await cancel_and_wait(self._task)
        await self._connection.close()


class ShardedPubSub:
    """SSUBSCRIBE on a Redis Cluster: a ``FastPubSub`` per master, each channel subscribed
    at the master that serves its slot, and their messages read as one."""

    def __init__(self, topology: bus.Topology, readers: list[FastPubSub], arrived: asyncio.Event) -> None:
        self._topology = topology
        self._readers = readers
        self._arrived = arrived

    @classmethod
    async def open(cls, url: str, max_unread: int = 10_000) -> ShardedPubSub:
        topology = await bus.Topology.fetch(url)
        arrived = asyncio.Event()
        readers: list[FastPubSub] = []
        try:
            for node in topology.nodes:
                connection = await RespConnection.open(node)
                readers.append(FastPubSub(connection, max_unread, sharded=True, arrived=arrived))
        except ConnectionError:
            for reader in readers:
                await reader.close()
            raise
        return cls(topology, readers, arrived)

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and wait until every node confirmed its channels."""
        readers = self._readers
        await asyncio.gather(*(readers[node].subscribe(*names) for node, names in self._by_node(channels)))

    async def unsubscribe(self, *channels: str) -> None:
        readers = self._readers
        await asyncio.gather(*(readers[node].unsubscribe(*names) for node, names in self._by_node(channels)))

    def _by_node(self, channels: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
        nodes: dict[int, list[str]] = {}
        for channel in channels:
            nodes.setdefault(self._topology.node_of(channel.encode()), []).append(channel)
        return [(node, tuple(names)) for node, names in nodes.items()]

    async def read(self, timeout: float) -> list[Message]:
        """The messages that are there on any node, or that arrive within ``timeout`` seconds."""
        self._arrived.clear()  # before looking: a message arriving after the look sets it again
        out = self._take()
        if out:
            return out
        try:
            async with asyncio.timeout(timeout):
                await self._arrived.wait()
        except TimeoutError:
            return []
        return self._take()

    def _take(self) -> list[Message]:
        out: list[Message] = []
        failure: ConnectionError | None = None
        for reader in self._readers:
            try:
                out += reader.take()
            except ConnectionError as exc:  # raised once what the others hold is handed over
                failure = exc
        if failure is not None and not out:
            raise failure
        return out

    async def close(self) -> None:
        for reader in self._readers:
            await reader.close()


PubSub = FastPubSub | ShardedPubSub


async def open_pubsub(url: str, cluster: bool, max_unread: int = 10_000) -> PubSub:
    """A pub/sub reader for a server (SUBSCRIBE) or, with ``cluster``, a cluster (SSUBSCRIBE)."""
    if cluster:
        return await ShardedPubSub.open(url, max_unread)
    return await FastPubSub.open(url, max_unread)


__all__ = ["FastPubSub", "Message", "PubSub", "RespError", "ShardedPubSub", "open_pubsub", "url_of"]
