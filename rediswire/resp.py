"""Redis's wire format (RESP) for the fast paths, and a minimal connection that speaks it.

The one place RESP is built and read outside redis-py: ``bulk``, ``command``,
``command_head`` and ``bulk_pairs`` build it; ``Replies`` (hiredis) parses replies, and
``replies_in`` / ``errors_in`` count the one-line replies the tick flow's commands get
(PUBLISH and HSET answer with an integer, or an error) without parsing them. The compiled
encoder (``kitewire/encoder.py``) writes RESP's bulk strings itself, inside its hot loop;
its tests read its output back with ``Replies``.

redis-py's pipeline objects cost ~15 us per command in Python; the tick flow writes
batches of ready RESP and counts the replies itself (``publisher/sink.py``). Everything
else (control, monitoring) uses redis-py's asyncio client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(ConnectionError):
    """The Redis connection failed or answered a setup command with an error."""


def bulk(data: bytes) -> bytes:
    """One bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def command(*args: bytes | str) -> bytes:
    """One command: an array of bulk strings."""
    return command_head(len(args), *args)


def command_head(total: int, *first: bytes | str) -> bytes:
    """The start of a command of ``total`` arguments: its array header and its ``first``
    arguments; the caller appends the other ``total - len(first)`` as bulk strings."""
    out = [b"*%d\r\n" % total]
    out += (bulk(arg.encode() if isinstance(arg, str) else arg) for arg in first)
    return b"".join(out)


def bulk_pairs(items: dict[int, bytes]) -> bytes:
    """``<token> <value>`` bulk-string pairs, as the field/value arguments of an HSET."""
    return b"".join(bulk(b"%d" % token) + bulk(value) for token, value in items.items())


def replies_in(data: bytes) -> int:
    """One-line replies (integers, statuses, errors) that end in ``data``."""
    return data.count(b"\n")


def errors_in(data: bytes, at_line_start: bool) -> int:
    """Error replies that begin in ``data`` (one-line replies only); ``at_line_start``: the
    bytes before ``data`` ended a reply."""
    return data.count(b"\n-") + (at_line_start and data[:1] == b"-")


def is_error_line(line: bytes) -> bool:
    """Whether one reply line (``replies_in``'s unit) is an error reply."""
    return line.startswith(b"-")


class Replies:
    """Replies parsed from the bytes fed in, in order (hiredis); an error reply comes out as
    ``hiredis.ReplyError`` (``is_error``)."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader()

    def feed(self, data: bytes) -> None:
        self._parser.feed(data)

    def next(self) -> object:
        """The next complete reply, or ``INCOMPLETE`` when more bytes are needed."""
        return self._parser.gets()

    def __iter__(self) -> Iterator[object]:
        while (reply := self._parser.gets()) is not False:
            yield reply


INCOMPLETE = False  # ``Replies.next`` when no whole reply has arrived


def is_error(reply: object) -> bool:
    return isinstance(reply, hiredis.ReplyError)


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
