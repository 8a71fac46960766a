"""Kite binary ticker frames <-> ticks.

One table of packet layouts (``LAYOUTS``) drives every direction:

* ``decode_frame``   frame bytes -> tick dicts (the contract's payload, minus ``received_at_ns``)
* ``PAYLOAD_WRITERS``  compiled payload programs: a packet -> its msgpack payload, which
  ``kitewire/encoder.py`` (the hot path) and its C speed-up run
* ``encode_packet`` / ``encode_frame``  tick dicts -> packets -> a frame (used by the simulator)

Pure code: no I/O, standard library only. A truncated frame or a packet of unknown
length never raises: the bad packet is skipped and counted, the good ones are kept.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter, truediv
from typing import Any

MODE_LTP = "ltp"
MODE_QUOTE = "quote"
MODE_FULL = "full"
MODES = (MODE_LTP, MODE_QUOTE, MODE_FULL)
MODE_RANK = {MODE_LTP: 0, MODE_QUOTE: 1, MODE_FULL: 2}

SEGMENTS = {
    "nse": 1, "nfo": 2, "cds": 3, "bse": 4, "bfo": 5,
    "bcd": 6, "mcx": 7, "mcxsx": 8, "indices": 9, "nco": 12,
}  # fmt: skip
INDEX_SEGMENT = SEGMENTS["indices"]
_DIVISORS = [100.0] * 256
_DIVISORS[SEGMENTS["cds"]] = 10_000_000.0
_DIVISORS[SEGMENTS["bcd"]] = 10_000.0
_DIVISORS[SEGMENTS["nco"]] = 10_000.0

HEARTBEAT = b"\x00"
Tick = dict[str, Any]
Path = tuple[str | int, ...]


def divisor_of(token: int) -> float:
    """What a raw integer price of this instrument is divided by to get rupees."""
    return _DIVISORS[token & 0xFF]


def is_tradable(token: int) -> bool:
    """Indices (segment 9) are not tradable; everything else is."""
    return token & 0xFF != INDEX_SEGMENT


@dataclass(frozen=True)
class Field:
    """One integer of a packet: where it goes in the tick, its struct code, if it is a price."""

    path: Path
    code: str = "I"
    price: bool = False
    hidden: bool = False  # on the wire but not in the tick (the index "price change")


def _p(*path: str | int) -> Field:
    return Field(path, price=True)


def _i(*path: str | int) -> Field:
    return Field(path)


def _depth() -> list[Field]:
    fields = []
    for side in ("buy", "sell"):
        for level in range(5):
            fields += [
                _i("depth", side, level, "quantity"),
                _p("depth", side, level, "price"),
                Field(("depth", side, level, "orders"), code="H2x"),
            ]
    return fields


@dataclass(frozen=True)
class PacketLayout:
    """The byte layout of one packet kind; the kind is told by the packet's length alone."""

    mode: str
    index: bool
    fields: tuple[Field, ...]
    struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt = ">" + "".join(f.code for f in self.fields)
        object.__setattr__(self, "struct", struct.Struct(fmt))

    @property
    def length(self) -> int:
        return self.struct.size

    @property
    def has_ohlc(self) -> bool:
        return any(f.path == ("ohlc", "close") for f in self.fields)


_TOKEN, _LTP = _i("instrument_token"), _p("last_price")
_INDEX_QUOTE = [
    _TOKEN, _LTP, _p("ohlc", "high"), _p("ohlc", "low"), _p("ohlc", "open"), _p("ohlc", "close"),
    Field(("price_change",), hidden=True),
]  # fmt: skip
_QUOTE = [
    _TOKEN, _LTP, _i("last_traded_quantity"), _p("average_traded_price"), _i("volume_traded"),
    _i("total_buy_quantity"), _i("total_sell_quantity"),
    _p("ohlc", "open"), _p("ohlc", "high"), _p("ohlc", "low"), _p("ohlc", "close"),
]  # fmt: skip
_FULL_EXTRA = [
    _i("last_trade_time"), _i("oi"), _i("oi_day_high"), _i("oi_day_low"), _i("exchange_timestamp"),
]  # fmt: skip

LTP = PacketLayout(MODE_LTP, False, (_TOKEN, _LTP))
INDEX_QUOTE = PacketLayout(MODE_QUOTE, True, tuple(_INDEX_QUOTE))
INDEX_FULL = PacketLayout(MODE_FULL, True, (*_INDEX_QUOTE, _i("exchange_timestamp")))
QUOTE = PacketLayout(MODE_QUOTE, False, tuple(_QUOTE))
FULL = PacketLayout(MODE_FULL, False, (*_QUOTE, *_FULL_EXTRA, *_depth()))

LAYOUTS: dict[int, PacketLayout] = {
    layout.length: layout for layout in (LTP, INDEX_QUOTE, INDEX_FULL, QUOTE, FULL)
}
assert sorted(LAYOUTS) == [8, 28, 32, 44, 184], "packet lengths are Kite's"
_BY_MODE = {(layout.mode, layout.index): layout for layout in LAYOUTS.values()}
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


# --- walking a frame -----------------------------------------------------------------------


def _walk(frame: bytes) -> tuple[int, list[tuple[int, int]], int, int]:
    """The one walk over a frame's packets, which every scanner below shares.

    Returns ``(count, spans, unread, end)``: the packet count the frame's header gives,
    each whole packet as ``(length, offset of its body)`` in order (known or not), how many
    packets the count promises that are cut short or missing, and where the whole packets
    end (a cut-short tail runs from there to the frame's end).
    """
    size = len(frame)
    if size < 2:
        return 0, [], 0, size
    (count,) = _U16.unpack_from(frame, 0)
    spans: list[tuple[int, int]] = []
    pos = 2
    for seen in range(count):
        if pos + 2 > size:
            return count, spans, count - seen, pos
        (length,) = _U16.unpack_from(frame, pos)
        end = pos + 2 + length
        if end > size:
            return count, spans, count - seen, pos
        spans.append((length, pos + 2))
        pos = end
    return count, spans, 0, pos


def scan_frame(frame: bytes) -> tuple[list[tuple[PacketLayout, int]], int]:
    """Find the packets of a binary frame.

    Returns ``(packets, malformed)``: each known packet as ``(layout, offset of its body)``,
    and how many packets were skipped (unknown length, or cut short by the frame's end).
    A heartbeat (1 byte) or an empty frame has no packets and nothing malformed.
    """
    _, spans, malformed, _ = _walk(frame)
    packets: list[tuple[PacketLayout, int]] = []
    for length, body in spans:
        layout = LAYOUTS.get(length)
        if layout is None:
            malformed += 1
        else:
            packets.append((layout, body))
    return packets, malformed


def token_at(frame: bytes, body: int) -> int:
    """The instrument token of the packet whose body starts at ``body``."""
    return _U32.unpack_from(frame, body)[0]


def first_token(frame: bytes) -> int | None:
    """The token of a frame's first packet (``split_frame`` puts a known one first); None
    for a frame too short to hold one (a heartbeat)."""
    return token_at(frame, 4) if len(frame) >= 8 else None


def frame_tokens(frame: bytes) -> list[int]:
    """The instrument tokens of a frame's known packets, in order."""
    packets, _ = scan_frame(frame)
    return [token_at(frame, offset) for _, offset in packets]


def drop_packets(frame: bytes, drop: Callable[[int, bytes], bool]) -> bytes:
    """The frame without the known packets for which ``drop(token, body)`` is true.

    Everything else is kept byte for byte, unknown and cut-short packets included, so the
    frame's decoder still sees and counts them as it would have. Returns ``frame`` itself
    when nothing is dropped.
    """
    count, spans, _, end = _walk(frame)
    kept: list[bytes] = []
    for length, body in spans:
        if not (length in LAYOUTS and drop(token_at(frame, body), frame[body : body + length])):
            kept.append(frame[body - 2 : body + length])
    dropped = len(spans) - len(kept)
    if not dropped:
        return frame
    return _U16.pack(count - dropped) + b"".join(kept) + frame[end:]


def split_frame(frame: bytes, lane_of: Callable[[int], int], lanes: int) -> list[bytes]:
    """The frame dealt out into one frame per lane, by ``lane_of(token)`` of each known
    packet (``b""`` for a lane that gets none); each begins with a known packet if it has
    one. Unknown packets, and a cut-short tail, go to the end of lane 0 byte for byte, so
    the decoder counts them just as in the whole frame."""
    if len(frame) < 2:
        return [frame] + [b""] * (lanes - 1)
    _, spans, unread, end = _walk(frame)
    parts: list[list[bytes]] = [[] for _ in range(lanes)]
    unknown: list[bytes] = []
    for length, body in spans:
        packet = frame[body - 2 : body + length]
        if length in LAYOUTS:
            parts[lane_of(token_at(frame, body))].append(packet)
        else:
            unknown.append(packet)
    parts[0] += unknown
    out = []
    for lane, packets in enumerate(parts):
        extra = unread if lane == 0 else 0
        if packets or extra or (lane == 0 and end < len(frame)):
            tail = frame[end:] if lane == 0 else b""
            out.append(_U16.pack(len(packets) + extra) + b"".join(packets) + tail)
        else:
            out.append(b"")
    return out


# --- decoding to dicts ---------------------------------------------------------------------


def _decode_packet(layout: PacketLayout, frame: bytes, offset: int) -> Tick:
    raw = layout.struct.unpack_from(frame, offset)
    token = raw[0]
    div = _DIVISORS[token & 0xFF]
    tick: Tick = {"tradable": token & 0xFF != INDEX_SEGMENT, "mode": layout.mode}
    for spec, value in zip(layout.fields, raw, strict=True):
        if spec.hidden:
            continue
        target = tick
        for key in spec.path[:-1]:
            target = target.setdefault(key, {})  # type: ignore[assignment]
        target[spec.path[-1]] = value / div if spec.price else value  # type: ignore[index]
    if "depth" in tick:
        tick["depth"] = {side: list(levels.values()) for side, levels in tick["depth"].items()}
    if layout.has_ohlc:
        close = tick["ohlc"]["close"]
        tick["change"] = (tick["last_price"] - close) * 100 / close if close else 0.0
    return tick


def decode_frame(frame: bytes) -> tuple[list[Tick], int]:
    """Decode a binary frame into tick dicts; returns ``(ticks, malformed packet count)``."""
    packets, malformed = scan_frame(frame)
    return [_decode_packet(layout, frame, offset) for layout, offset in packets], malformed


# --- msgpack fast path ---------------------------------------------------------------------


class _PayloadWriter:
    """Writes one layout's tick straight into msgpack with a single ``struct.pack``.

    The payload's shape is fixed per layout, so it is compiled once into constant byte
    chunks (map headers, keys, type markers) and value slots; per packet we only
    divide the prices and drop the values into the slots.
    """

    def __init__(self, layout: PacketLayout) -> None:
        self.unpack_from = layout.struct.unpack_from
        nraw = len(layout.fields)
        price_idx = [i for i, f in enumerate(layout.fields) if f.price]
        self.nprices = len(price_idx)
        self.prices = _tuple_getter(price_idx)
        self.has_ohlc = layout.has_ohlc
        paths = [f.path for f in layout.fields]
        self.last_k = price_idx.index(paths.index(("last_price",)))
        self.close_k = price_idx.index(paths.index(("ohlc", "close"))) if self.has_ohlc else 0
        extra = nraw + self.nprices  # index of the first derived value in the source tuple
        tradable, change, received, seq, epoch = range(extra, extra + 5)

        shape: dict[str | int, Any] = {
            "tradable": ("B", tradable),
            "mode": layout.mode,
            "instrument_token": ("I", 0),
        }
        for i, spec in enumerate(layout.fields):
            if spec.hidden or i == 0:
                continue
            node = shape
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            node[spec.path[-1]] = ("d", nraw + price_idx.index(i)) if spec.price else (spec.code, i)
            if spec.path == ("ohlc", "close"):
                shape["change"] = ("d", change)
        shape["received_at_ns"] = ("Q", received)
        shape["seq"] = ("Q", seq)  # the publisher's per-token sequence number
        shape["epoch"] = ("Q", epoch)  # and its epoch id
        # The payload as a tree: constants (keys, the mode) and (code, source) value slots,
        # in the payload's order; consumers/payloads.py reads payloads back by it.
        self.shape = shape

        chunks: list[bytearray] = [bytearray()]
        slots: list[tuple[str, int]] = []
        _compile(shape, chunks, slots)
        # The compiled program, as the C speed-up reads it (kitewire/encoder.py).
        self.chunks = [bytes(chunk) for chunk in chunks]
        self.slot_specs = slots
        self.price_fields = price_idx
        self.field_offsets = _offsets(layout.fields)
        widths = {"I": 4, "H": 2, "d": 8, "Q": 8, "B": 1}
        self.payload_length = sum(map(len, self.chunks)) + sum(widths[code] for code, _ in slots)
        pairs = zip(chunks[:-1], slots, strict=True)
        fmt = ">" + "".join(f"{len(c)}s{code}" for c, (code, _) in pairs) + f"{len(chunks[-1])}s"
        self.pack = struct.Struct(fmt).pack
        self.template: list[Any] = []
        for chunk in chunks[:-1]:
            self.template += [bytes(chunk), None]
        self.template.append(bytes(chunks[-1]))
        self.slots = itemgetter(*(src for _, src in slots))

    def write(
        self, frame: bytes, offset: int, received_at_ns: int, seq: int, epoch: int
    ) -> tuple[int, bytes]:
        """(token, msgpack payload) of the packet at ``offset``, stamped with ``seq``/``epoch``."""
        raw = self.unpack_from(frame, offset)
        token = raw[0]
        prices = tuple(map(truediv, self.prices(raw), repeat(_DIVISORS[token & 0xFF], self.nprices)))
        change = 0.0
        if self.has_ohlc:
            close = prices[self.close_k]
            if close:
                change = (prices[self.last_k] - close) * 100 / close
        tradable = 0xC2 if token & 0xFF == INDEX_SEGMENT else 0xC3
        args = self.template.copy()
        args[1::2] = self.slots(raw + prices + (tradable, change, received_at_ns, seq, epoch))
        return token, self.pack(*args)


def _offsets(fields: tuple[Field, ...]) -> list[tuple[int, int]]:
    """(byte offset, width) of each field's value in the packet."""
    out, pos = [], 0
    for spec in fields:
        width = struct.calcsize(">" + spec.code)
        out.append((pos, 2 if spec.code == "H2x" else width))
        pos += width
    return out


def _tuple_getter(indexes: list[int]) -> Any:
    """itemgetter that returns a tuple even for one index."""
    if len(indexes) == 1:
        return itemgetter(slice(indexes[0], indexes[0] + 1))
    return itemgetter(*indexes)


_MARKERS = {"I": b"\xce", "H2x": b"\xcd", "d": b"\xcb", "Q": b"\xcf", "B": b""}
_SLOT_CODES = {"H2x": "H"}


def _compile(node: Any, chunks: list[bytearray], slots: list[tuple[str, int]]) -> None:
    """Append the msgpack encoding of a shape node: constants into chunks, values as slots."""
    if isinstance(node, tuple):
        code, source = node
        chunks[-1] += _MARKERS[code]
        slots.append((_SLOT_CODES.get(code, code), source))
        chunks.append(bytearray())
    elif isinstance(node, str):
        chunks[-1] += _str_header(len(node)) + node.encode()
    elif all(isinstance(key, int) for key in node):  # depth levels: an array
        chunks[-1] += bytes([0x90 | len(node)])
        for key in sorted(node):
            _compile(node[key], chunks, slots)
    else:
        n = len(node)
        chunks[-1] += bytes([0x80 | n]) if n < 16 else b"\xde" + _U16.pack(n)
        for key, value in node.items():
            _compile(key, chunks, slots)
            _compile(value, chunks, slots)


def _str_header(n: int) -> bytes:
    assert n < 32, "keys are short"
    return bytes([0xA0 | n])


PAYLOAD_WRITERS = {length: _PayloadWriter(layout) for length, layout in LAYOUTS.items()}


# --- encoding ------------------------------------------------------------------------------


def layout_for(mode: str, token: int) -> PacketLayout:
    """The packet layout Kite uses for this mode and instrument."""
    index = not is_tradable(token) and mode != MODE_LTP
    return _BY_MODE[(mode, index)]


def encode_packet(tick: Mapping[str, Any]) -> bytes:
    """Encode a tick dict (as ``decode_frame`` returns them) into one packet body.

    Prices are rounded to the instrument's tick of 1/divisor. Raises ``ValueError`` for an
    unknown mode or a value that does not fit its field.
    """
    token = int(tick["instrument_token"])
    mode = tick["mode"]
    if mode not in MODE_RANK:
        raise ValueError(f"unknown mode {mode!r}")
    layout = layout_for(mode, token)
    div = divisor_of(token)
    values = []
    for spec in layout.fields:
        if spec.hidden:  # Kite's index "price change": last - close, raw, two's complement
            change = _raw_price(tick["last_price"], div) - _raw_price(tick["ohlc"]["close"], div)
            value = change % 2**32
        else:
            value = _get(tick, spec.path)
            value = _raw_price(value, div) if spec.price else int(value)
        values.append(value)
    try:
        return layout.struct.pack(*values)
    except struct.error as exc:
        raise ValueError(f"tick of {token} does not fit a {mode} packet: {exc}") from None


def encode_frame(packets: Iterable[bytes]) -> bytes:
    """Join packet bodies into one binary frame: count, then length-prefixed packets."""
    parts = [b""]
    count = 0
    for packet in packets:
        parts.append(_U16.pack(len(packet)))
        parts.append(packet)
        count += 1
    parts[0] = _U16.pack(count)
    return b"".join(parts)


def _raw_price(price: float, div: float) -> int:
    return round(price * div)


def _get(tick: Mapping[str, Any], path: Path) -> Any:
    value: Any = tick
    for key in path:
        value = value[key]
    return value
