"""Codec throughput: kitebus decode paths beside Kite's official parser, in packets/s.

    .venv/bin/python bench/codec.py [--seconds 1.0]

Frames hold 100 packets of one kind. "encoder python" and "encoder C" are the publisher's
hot call (frame -> RESP of the PUBLISHes and the {ns}:last fields, with seq and epoch);
"dicts+packb" is the straightforward alternative; the last column is the fastest encoder
this installation has against the official parser.

Those frames' tokens are all in cache. The second table is the encoder on the publisher's
working set: ``--tokens`` instruments (sequence table, claims, last-value cache) in frames
of 500 packets, as the publisher calls it (one cache dict, the book's placement dict as
the claims), in ns a tick: median (min-max) of 5 runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.stack import measured_on
from kitewire import codec, encoder

PACKETS_PER_FRAME = 100
WORKING_SET_FRAME = 500  # as bench/publisher.py's feed writes them


def make_frame(mode: str, rng: random.Random, tokens: list[int] | None = None) -> bytes:
    """A frame of ``mode`` packets of ``tokens`` (default: PACKETS_PER_FRAME random ones)."""
    if tokens is None:
        tokens = [rng.randrange(1, 2**24) << 8 | 1 for _ in range(PACKETS_PER_FRAME)]
    return codec.encode_frame([codec.encode_packet(_tick(token, mode, rng)) for token in tokens])


def _tick(token: int, mode: str, rng: random.Random) -> dict:
    """A tick of ``mode`` with random prices and quantities."""
    price = rng.randrange(10_000, 500_000) / 100
    tick: dict = {"instrument_token": token, "mode": mode, "last_price": price}
    if mode != "ltp":
        tick |= {
            "last_traded_quantity": rng.randrange(1, 500),
            "average_traded_price": price,
            "volume_traded": rng.randrange(10**7),
            "total_buy_quantity": rng.randrange(10**6),
            "total_sell_quantity": rng.randrange(10**6),
            "ohlc": {"open": price, "high": price + 5, "low": price - 5, "close": price - 1},
        }
    if mode == "full":
        tick |= {
            "last_trade_time": 1764330000, "oi": 0, "oi_day_high": 0, "oi_day_low": 0,
            "exchange_timestamp": 1764330000,
            "depth": {
                side: [{"quantity": 10 * i, "price": price + i, "orders": i} for i in range(5)]
                for side in ("buy", "sell")
            },
        }  # fmt: skip
    return tick


def rate(fn: Callable[[bytes], object], frame: bytes, seconds: float) -> float:
    """Best of three runs, packets per second."""
    best = 0.0
    for _ in range(3):
        frames, start = 0, time.perf_counter()
        deadline = start + seconds / 3
        while time.perf_counter() < deadline:
            for _ in range(10):
                fn(frame)
            frames += 10
        best = max(best, frames * PACKETS_PER_FRAME / (time.perf_counter() - start))
    return best


def working_set_ns(enc: encoder.Encoder, frames: list[bytes], tokens: list[int], seconds: float) -> float:
    """ns a tick of ``enc`` cycling through ``frames`` with one cache dict, as the sink does."""
    enc.set_claimed({token: 0 for token in tokens})
    latest: dict[int, bytes] = {}
    for frame in frames:  # every token's sequence entry and cached payload made
        enc.encode(frame, time.time_ns(), latest)
    ticks, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for frame in frames:
            enc.encode(frame, time.time_ns(), latest)
        ticks += len(frames) * WORKING_SET_FRAME
    return (time.perf_counter() - start) / ticks * 1e9


def working_set(count: int, seconds: float) -> None:
    rng = random.Random(2)
    tokens = [rng.randrange(1, 2**24) << 8 | 1 for _ in range(count)]
    builds: dict[str, Callable[[bytes], Any]] = {"python": encoder.PyFrameEncoder}
    if encoder.SPEEDUPS:
        builds["C"] = encoder.compiled_encoder
    print()
    print(f"# the encoder on {count:,} tokens, {WORKING_SET_FRAME}-packet frames: "
          "ns a tick, median (min-max) of 5")  # fmt: skip
    print(f"{'mode':6} " + " ".join(f"{'encoder ' + name:>22}" for name in builds))
    for mode in ("full", "quote", "ltp"):
        frames = []
        for _ in range(2 * count // WORKING_SET_FRAME):  # each token about twice a cycle
            frames.append(make_frame(mode, rng, rng.sample(tokens, WORKING_SET_FRAME)))
        runs: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(5):  # the builds interleaved, so a noisy moment hits both
            for name, build in builds.items():
                runs[name].append(working_set_ns(build(b"kite:ticks:"), frames, tokens, seconds / 5))
        cells = []
        for values in runs.values():
            values.sort()
            cells.append(f"{values[2]:.0f} ({values[0]:.0f}-{values[-1]:.0f})")
        print(f"{mode:6} " + " ".join(f"{cell:>22}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    parser.add_argument("--tokens", type=int, default=9000, help="the working set's instruments (0: skip)")
    args = parser.parse_args()
    try:
        from kiteconnect import KiteTicker
    except ImportError:
        sys.exit("bench/codec.py needs kiteconnect (the test extras) for the comparison")
    official = KiteTicker("bench", "bench")
    pure = encoder.PyFrameEncoder(b"kite:ticks:")
    compiled = encoder.compiled_encoder(b"kite:ticks:")
    rng = random.Random(1)

    def dicts_packb(frame: bytes) -> None:
        now = time.time_ns()
        for tick in codec.decode_frame(frame)[0]:
            tick["received_at_ns"] = now
            msgpack.packb(tick)

    paths = {
        "official parser": official._parse_binary,
        "kitebus dicts": codec.decode_frame,
        "dicts+packb": dicts_packb,
        "encoder python": lambda frame: pure.encode(frame, time.time_ns(), {}),
    }
    if compiled is not None:
        paths["encoder C"] = lambda frame: compiled.encode(frame, time.time_ns(), {})
    print(f"# {measured_on()}; {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cpus; packets/s, best of 3")  # fmt: skip
    print(f"{'mode':6} " + " ".join(f"{name:>16}" for name in paths) + f" {'encoder/official':>18}")
    for mode in ("full", "quote", "ltp"):
        frame = make_frame(mode, rng)
        rates = {name: rate(fn, frame, args.seconds) for name, fn in paths.items()}
        ratio = rates["encoder C" if compiled is not None else "encoder python"] / rates["official parser"]
        cells = " ".join(f"{value:16,.0f}" for value in rates.values())
        print(f"{mode:6} {cells} {ratio:17.2f}x")
    if args.tokens:
        working_set(args.tokens, args.seconds * 2)


if __name__ == "__main__":
    main()
