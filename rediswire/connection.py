"""A minimal asyncio socket to Redis that speaks RESP (``rediswire/resp.py``): the tick
sink's lanes, the pub/sub reader and the few one-off commands that go around redis-py."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import unquote, urlsplit

from rediswire.resp import INCOMPLETE, Replies, RespError, command, is_error


class RespConnection:
    """One socket to Redis, owned by one user (the tick sink)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replies = Replies()

    @classmethod
    async def open(cls, url: str, timeout: float = 5.0) -> RespConnection:
        """Connect to a redis://, rediss:// or unix:// URL, authenticate, select the db."""
        parts = urlsplit(url)
        try:
            async with asyncio.timeout(timeout):
                if parts.scheme == "unix":
                    reader, writer = await asyncio.open_unix_connection(parts.path)
                else:
                    context = ssl.create_default_context() if parts.scheme == "rediss" else None
                    reader, writer = await asyncio.open_connection(
                        parts.hostname or "localhost", parts.port or 6379, ssl=context
                    )
                connection = cls(reader, writer)
                setup = []
                if parts.password:
                    user = unquote(parts.username) if parts.username else "default"
                    setup.append(command("AUTH", user, unquote(parts.password)))
                db = parts.path.strip("/") if parts.scheme != "unix" else ""
                if db and db != "0":
                    setup.append(command("SELECT", db))
                if setup and await connection.execute(b"".join(setup), len(setup)):
                    await connection.close()
                    raise RespError("Redis refused AUTH or SELECT")
                return connection
        except (OSError, TimeoutError) as exc:
            raise RespError(f"cannot connect to Redis: {exc.__class__.__name__}") from exc

    async def execute(self, commands: bytes, replies: int) -> int:
        """Send pre-encoded commands and wait for their ``replies``; returns how many were
        errors. For setup commands; the tick flow pipelines with ``write`` and ``read``.
        Raises ConnectionError (or OSError) when the socket fails."""
        self.write(commands)
        await self.drain()
        errors = 0
        for _ in range(replies):
            errors += is_error(await self._reply())
        return errors

    async def call(self, *args: bytes | str) -> object:
        """One command and its reply, parsed (an error reply comes back as hiredis.ReplyError)."""
        self.write(command(*args))
        await self.drain()
        return await self._reply()

    async def _reply(self) -> object:
        while (reply := self._replies.next()) is INCOMPLETE:
            self._replies.feed(await self.read())
        return reply

    def write(self, data: bytes) -> None:
        """Queue bytes for Redis without waiting."""
        self._writer.write(data)

    async def drain(self) -> None:
        """Wait while the socket's send buffer is above its high-water mark."""
        await self._writer.drain()

    async def read(self) -> bytes:
        """The next bytes from Redis; raises RespError when Redis closed the connection."""
        data = await self._reader.read(1 << 16)
        if not data:
            raise RespError("Redis closed the connection")
        return data

    def set_write_limit(self, high: int) -> None:
        """Let ``drain`` wait only above ``high`` unsent bytes (the sink bounds what is in flight)."""
        self._writer.transport.set_write_buffer_limits(high=high)

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError):
            pass
