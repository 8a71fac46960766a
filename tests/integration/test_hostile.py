"""Hostile input against the running publisher: garbage frames from the server, garbage
requests from anyone who can write the stream. Nothing may kill a task, reach a key
outside the namespace, or grow the control stream."""

from __future__ import annotations

import json
import random

from tests.integration.conftest import eventually

INFY = 408065


def _garbage_frames(rng: random.Random, n: int) -> list[bytes | str]:
    """Frames a broken or hostile server could send: random bytes, counts and lengths that
    lie, huge counts, real packet lengths with junk inside, text that is not Kite's JSON."""
    frames: list[bytes | str] = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            frames.append(rng.randbytes(rng.randrange(0, 600)))
        elif kind == 1:  # a count that promises far more than is there
            frames.append(rng.randrange(2**16).to_bytes(2, "big") + rng.randbytes(rng.randrange(0, 50)))
        elif kind == 2:  # known packet lengths, random contents (any token, any price)
            packets = [rng.choice([8, 28, 32, 44, 184]) for _ in range(rng.randrange(1, 6))]
            body = b"".join(n.to_bytes(2, "big") + rng.randbytes(n) for n in packets)
            frames.append(len(packets).to_bytes(2, "big") + body)
        elif kind == 3:  # a length running past the end
            frames.append(b"\x00\x01" + rng.randrange(185, 2**16).to_bytes(2, "big") + rng.randbytes(20))
        elif kind == 4:
            frames.append(rng.choice(['{"type": "order"', "[]", "null", '{"type": 5, "data": {}}', "\x00"]))
        else:
            kind_of = rng.choice(["error", "message", "order"])
            frames.append(json.dumps({"type": kind_of, "data": rng.random()}))
    return frames


async def test_garbage_frames_never_kill_a_connection_or_the_publisher(publisher, control, simulator, rds):
    await control.subscribe([INFY], client="t")
    reconnects = sum(c.reconnects for c in publisher.connections)
    for frame in _garbage_frames(random.Random(7), 600):
        await simulator.send_raw(frame)
    await eventually(lambda: publisher.sink.malformed > 100)
    assert all(c.state == "live" for c in publisher.connections)
    assert sum(c.reconnects for c in publisher.connections) == reconnects
    # the feed still works: a fresh tick of INFY reaches its channel
    before = publisher.sink.published
    await eventually(lambda: publisher.sink.published > before + 3)
    assert await rds.hexists("kite:last", str(INFY))


_CRAFTED = [
    {"op": "subscribe", "tokens": "1", "client": "../../etc"},
    {"op": "subscribe", "tokens": "1", "client": "*"},
    {"op": "subscribe", "tokens": "1", "client": "{other}"},
    {"op": "subscribe", "tokens": "1", "client": "a\nb"},
    {"op": "subscribe", "tokens": "1", "client": "x" * 100_000},
    {"op": "subscribe", "tokens": "*"},
    {"op": "subscribe", "tokens": "1" * 300_000},
    {"op": "subscribe", "tokens": "NSE:{INFY}"},
    {"op": "mode", "tokens": "1", "mode": "full\r\n"},
    {"op": b"\xff\xfe", "tokens": b"\x00"},
    {"op": "subscribe\x00", "tokens": "1"},
    {"op": "subscribe", "tokens": "1", "ttl": "1e400"},
    {"op": "subscribe", "tokens": "1", "ttl": "nan"},
    {"op": "rebalance", "tokens": "1"},
    {"tokens": "1"},
    {"junk": "x" * 1000},
]


async def test_garbage_requests_are_answered_and_stay_inside_the_namespace(publisher, control, rds, keys):
    rng = random.Random(11)
    garbage = list(_CRAFTED)
    for _ in range(400):
        names = rng.choices(["op", "tokens", "mode", "client", "ttl", "x"], k=rng.randrange(1, 5))
        fields = {name: rng.randbytes(rng.randrange(1, 40)) for name in names}
        garbage.append(fields)
    async with rds.pipeline(transaction=False) as pipe:
        for fields in garbage:
            pipe.xadd(keys.control, fields)
        ids = [entry.decode() for entry in await pipe.execute()]
    valid = await control.subscribe([INFY], client="after-the-garbage")
    assert valid.ok and publisher.book.claims == {"after-the-garbage": {INFY: "quote"}}

    results = {f[b"request"].decode(): f for _, f in await rds.xrange(keys.control_results)}
    assert set(ids) <= set(results)  # each got its answer, in order, before the valid one
    assert all(results[i][b"ok"] == b"0" and results[i][b"error"] for i in ids)
    assert all(results[i][b"client"].decode().isprintable() for i in ids)  # "a\nb" forges no log line
    assert all(key.startswith(b"kite:") for key in await rds.keys("*"))
    assert await rds.xlen(keys.control) < 250  # answered entries are trimmed away
    assert all(c.state == "live" for c in publisher.connections)
