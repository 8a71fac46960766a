"""The hiredis pub/sub reader (``consumers/pubsub.py``) over a scripted wire: messages in
batches, and the replies that must end it (an error, a slot that moved away)."""

from __future__ import annotations

import asyncio

import pytest

from consumers.pubsub import FastPubSub
from rediswire import resp
from rediswire.resp import RespError
from tests.resp import parse_commands


class ScriptedWire:
    """What ``FastPubSub`` needs of a ``RespConnection``: the server's bytes come from a
    queue, and each (S)SUBSCRIBE or (S)UNSUBSCRIBE written is confirmed as Redis would."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[bytes] = []

    async def read(self) -> bytes:
        return await self.incoming.get()

    def write(self, data: bytes) -> None:
        self.sent.append(data)
        for name, *channels in parse_commands(data):
            for n, channel in enumerate(channels, 1):
                self.push(name.lower(), channel, n)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def push(self, *reply: bytes | int) -> None:
        """A push reply, as Redis encodes one (an array of bulk strings and integers)."""
        items = [b":%d\r\n" % item if isinstance(item, int) else resp.bulk(item) for item in reply]
        self.incoming.put_nowait(b"*%d\r\n" % len(items) + b"".join(items))


async def _subscribed(sharded: bool = False) -> tuple[FastPubSub, ScriptedWire]:
    wire = ScriptedWire()
    reader = FastPubSub(wire, sharded=sharded)  # type: ignore[arg-type]
    await asyncio.wait_for(reader.subscribe("ch:1"), 5)
    return reader, wire


async def test_messages_arrive_in_order_in_one_batch() -> None:
    reader, wire = await _subscribed()
    assert wire.sent == [resp.command(b"SUBSCRIBE", b"ch:1")]
    wire.push(b"message", b"ch:1", b"a")
    wire.push(b"message", b"ch:1", b"b")
    got: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(5):
        while len(got) < 2:
            got += await reader.read(1.0)
    assert got == [(b"ch:1", b"a"), (b"ch:1", b"b")]
    await reader.close()


async def test_an_error_reply_ends_the_reader_with_redis_words() -> None:
    wire = ScriptedWire()
    wire.write = wire.sent.append  # type: ignore[method-assign]  # no confirmation, an error instead
    reader = FastPubSub(wire)  # type: ignore[arg-type]
    wire.incoming.put_nowait(b"-NOPERM this user has no permissions to access the 'ch:1' channel\r\n")
    with pytest.raises(RespError, match="refused a pub/sub command: NOPERM"):
        await asyncio.wait_for(reader.subscribe("ch:1"), 5)
    with pytest.raises(RespError, match="NOPERM"):  # and every read after says the same
        await reader.read(0.1)
    await reader.close()


async def test_messages_before_a_failure_are_handed_out_first() -> None:
    reader, wire = await _subscribed()
    wire.incoming.put_nowait(resp.command(b"message", b"ch:1", b"a") + b"-ERR gone\r\n")
    assert await asyncio.wait_for(reader.read(5.0), 5) == [(b"ch:1", b"a")]
    with pytest.raises(RespError, match="ERR gone"):
        await asyncio.wait_for(reader.read(5.0), 5)
    await reader.close()


async def test_an_unasked_sunsubscribe_means_the_slot_moved() -> None:
    reader, wire = await _subscribed(sharded=True)
    assert wire.sent == [resp.command(b"SSUBSCRIBE", b"ch:1")]
    wire.push(b"sunsubscribe", b"ch:1", 0)
    with pytest.raises(RespError, match="the slot of b'ch:1' moved to another node"):
        await asyncio.wait_for(reader.read(5.0), 5)
    await reader.close()


async def test_an_asked_sunsubscribe_is_a_confirmation() -> None:
    reader, wire = await _subscribed(sharded=True)
    await asyncio.wait_for(reader.unsubscribe("ch:1"), 5)  # confirmed by an sunsubscribe
    wire.push(b"smessage", b"ch:2", b"x")  # still reading
    assert await asyncio.wait_for(reader.read(5.0), 5) == [(b"ch:2", b"x")]
    await reader.close()
