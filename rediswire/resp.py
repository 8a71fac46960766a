"""Redis's wire format (RESP) for the fast paths: built and read, no I/O.

The one place RESP is built and read outside redis-py: ``bulk``, ``command``,
``command_head`` and ``bulk_pairs`` build it; ``Replies`` (hiredis) parses replies, and
``replies_in`` / ``errors_in`` count the one-line replies the tick flow's commands get
(PUBLISH and HSET answer with an integer, or an error) without parsing them. The compiled
encoder (``kitewire/encoder.py``) writes RESP's bulk strings itself, inside its hot loop;
its tests read its output back with ``Replies``.

redis-py's pipeline objects cost ~15 us per command in Python; the tick flow writes
batches of ready RESP and counts the replies itself (``publisher/sink.py``), over the
minimal socket of ``rediswire/connection.py``. Everything else (control, monitoring)
uses redis-py's asyncio client.
"""

from __future__ import annotations

from collections.abc import Iterator

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
        self.gets = self._parser.gets  # ``next`` without the Python call around it, for hot loops

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
