"""The benchmarks measure what the publisher sends."""

from __future__ import annotations

import msgpack

from bench.publisher import NullEncoder, payload
from kitewire import codec
from tests.integration.conftest import eventually

INFY = 408065


async def test_the_null_publisher_and_the_bus_limit_use_the_publishers_payloads(
    publisher, control, rds, keys
) -> None:
    sizes = {}
    for mode in ("ltp", "quote", "full"):
        await control.subscribe([INFY], mode=mode, client="bench")
        await control.set_mode([INFY], mode, client="bench")

        async def ticked_in(mode: str = mode) -> bytes | None:
            last = await rds.hget(keys.last, str(INFY))
            return last if last and msgpack.unpackb(last)["mode"] == mode else None

        sent, ours = await eventually(ticked_in), payload(mode)
        assert len(ours) == len(sent), mode  # redis-benchmark sends this many bytes
        assert msgpack.unpackb(ours).keys() == msgpack.unpackb(sent).keys()  # seq, epoch
        frame = codec.encode_frame([codec.encode_packet(msgpack.unpackb(sent))])
        publishes, fields, ticks, _ = NullEncoder(ours, 1).encode(frame, 0, {})
        assert ticks == 1 and ours in publishes and ours in fields  # the null publisher sends it
        sizes[mode] = len(sent)
    assert sizes == {"ltp": 114, "quote": 318, "full": 823}
