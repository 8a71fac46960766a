"""A minimal Redis connection for the tick flow: pipelined writes of pre-encoded RESP.

redis-py's pipeline objects cost ~15 us per command in Python; the tick flow writes
batches of ready RESP and counts the replies itself (``publisher/sink.py``). Setup
commands are answered through hiredis. Everything else (control, monitoring) uses
redis-py's asyncio client.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(ConnectionError):
    """The Redis connection failed or answered a setup command with an error."""


def pack_command(*args: bytes | str) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class RespConnection:
    """One socket to Redis, owned by one user (the tick sink)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()

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
                    setup.append(pack_command("AUTH", user, unquote(parts.password)))
                db = parts.path.strip("/") if parts.scheme != "unix" else ""
                if db and db != "0":
                    setup.append(pack_command("SELECT", db))
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
        parser = self._parser
        while replies:
            reply = parser.gets()
            if reply is False:
                parser.feed(await self.read())
                continue
            replies -= 1
            if isinstance(reply, hiredis.ReplyError):
                errors += 1
        return errors

    async def call(self, *args: bytes | str) -> object:
        """One command and its reply, parsed (an error reply comes back as hiredis.ReplyError)."""
        self.write(pack_command(*args))
        await self.drain()
        while (reply := self._parser.gets()) is False:
            self._parser.feed(await self.read())
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
