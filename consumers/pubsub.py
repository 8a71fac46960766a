"""A pub/sub connection read with hiredis, messages handed over in batches.

redis-py's ``PubSub.get_message`` costs about 20 us a message in Python: a consumer of
every instrument then cannot keep up with a busy feed and is cut by Redis. This reads
whatever the socket has, parses it in C (hiredis) and hands the messages over as a list.
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import quote

import hiredis
import redis.asyncio as redis

from publisher.resp import RespConnection, RespError, pack_command
from publisher.tasks import cancel_and_wait

Message = tuple[bytes, bytes]  # (channel, data)
SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE command


def url_of(client: redis.Redis) -> str:
    """The URL a redis-py client connects to (host or unix socket, credentials, db, TLS)."""
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

    def __init__(self, connection: RespConnection, max_unread: int = 10_000) -> None:
        self._connection = connection
        self._parser = hiredis.Reader()
        self._ready: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._awaiting: set[tuple[bytes, bytes]] = set()  # (confirmation, channel) not yet seen
        self._confirmed = asyncio.Event()
        self._failure: ConnectionError | None = None
        self.max_unread = max_unread
        self._task = asyncio.create_task(self._pump(), name="pubsub-reader")

    @classmethod
    async def open(cls, url: str, max_unread: int = 10_000) -> FastPubSub:
        return cls(await RespConnection.open(url), max_unread)

    async def subscribe(self, *channels: str) -> None:
        """Subscribe and wait until Redis confirmed every channel (so that a snapshot read
        afterwards can miss nothing)."""
        await self._command(b"SUBSCRIBE", b"subscribe", channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._command(b"UNSUBSCRIBE", b"unsubscribe", channels)

    async def _command(self, command: bytes, confirmation: bytes, channels: tuple[str, ...]) -> None:
        names = sorted({c.encode() for c in channels})
        expected = {(confirmation, name) for name in names}
        self._awaiting |= expected
        for start in range(0, len(names), SUBSCRIBE_BATCH):
            self._connection.write(pack_command(command, *names[start : start + SUBSCRIBE_BATCH]))
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
            if not self._ready and self._failure is not None:
                raise self._failure
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
        parser = self._parser
        parser.feed(data)
        arrived = confirmed = False
        while (reply := parser.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise RespError(f"Redis refused a pub/sub command: {reply}")
            if reply[0] == b"message":
                self._ready.append((reply[1], reply[2]))
                arrived = True
            else:
                self._awaiting.discard((reply[0], reply[1]))
                confirmed = True
        if arrived:
            self._arrived.set()
        if confirmed:
            self._confirmed.set()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self._connection.close()


__all__ = ["FastPubSub", "Message", "RespError", "url_of"]
