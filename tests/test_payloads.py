"""The fixed-shape payload decoder: the dict msgpack.unpackb gives, on every layout and any
values, and msgpack's own answer for any payload it does not recognise."""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers import payloads
from kitewire import codec
from simulator.market import Market
from tests.test_encoder import ON_CI, SWITCHED_OFF, _compiler

COMPILED = payloads.compiled_decoder()
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the C speed-up is not built here")
PATHS = ["python", pytest.param("compiled", marks=needs_compiled)]
TEMPLATES = {t.length: t for t in payloads.TEMPLATES}
U64 = st.integers(0, 2**64 - 1)


def _decoder(path: str, fallback: payloads.Decoder = msgpack.unpackb) -> payloads.Decoder:
    if path == "python":
        return payloads.python_decoder(fallback=fallback)
    return payloads.compiled_decoder(fallback=fallback)  # type: ignore[return-value]


def _same(a: Any, b: Any, where: str = "tick") -> None:
    """Equal, and of the same types, key order, float bits and gc tracking all the way down."""
    assert type(a) is type(b), where
    assert gc.is_tracked(a) == gc.is_tracked(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), where  # -0.0 and NaN too
    else:
        assert a == b, where


def _payload(template: payloads.Template, values: list[bytes]) -> bytes:
    """A payload of ``template`` with its value slots filled with ``values`` (raw bytes)."""
    _, expected = template.mask()
    out = bytearray(expected)
    for (_, offset), value in zip(template.slots, values, strict=True):
        out[offset : offset + len(value)] = value
    return bytes(out)


@st.composite
def any_payload(draw: st.DrawFn) -> bytes:
    """A payload of any layout with any bits in its values (NaN, infinities, -0.0, 2**64 - 1)."""
    template = draw(st.sampled_from(payloads.TEMPLATES))
    values = [
        bytes([draw(st.sampled_from([payloads.FALSE, payloads.TRUE]))])
        if code == "B"
        else draw(st.binary(min_size=payloads.WIDTHS[code], max_size=payloads.WIDTHS[code]))
        for code, _ in template.slots
    ]
    return _payload(template, values)


@st.composite
def published(draw: st.DrawFn) -> bytes:
    """A payload as the publisher writes it, from any packet bytes of a known length (any
    segment: indices, currencies, unknown ones) and any received_at_ns / seq / epoch."""
    length = draw(st.sampled_from(sorted(codec.LAYOUTS)))
    packet = draw(st.binary(min_size=length, max_size=length))
    _, payload = codec.PAYLOAD_WRITERS[length].write(packet, 0, draw(U64), draw(U64), draw(U64))
    return payload


def test_there_is_a_template_for_every_layout_and_it_is_the_writers() -> None:
    assert sorted(TEMPLATES) == sorted(w.payload_length for w in codec.PAYLOAD_WRITERS.values())
    for writer in codec.PAYLOAD_WRITERS.values():
        template = TEMPLATES[writer.payload_length]
        assert b"".join(chunk for _, chunk in template.constants) == b"".join(writer.chunks)
        assert [code for code, _ in template.slots] == [code for code, _ in writer.slot_specs]


@pytest.mark.parametrize("path", PATHS)
@given(payload=st.one_of(published(), any_payload()))
def test_every_layout_decodes_as_msgpack_does(path: str, payload: bytes) -> None:
    _same(_decoder(path)(payload), msgpack.unpackb(payload))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("segment", [1, 2, 3, 6, 9, 12, 0, 200])  # nse, nfo, cds, bcd, indices, nco, odd
@pytest.mark.parametrize("mode", codec.MODES)
def test_index_and_odd_segments_decode_as_msgpack_does(path: str, segment: int, mode: str) -> None:
    token = 12345 << 8 | segment
    layout = codec.layout_for(mode, token)
    packet = struct.pack(">I", token) + bytes(range(7, 7 + layout.length - 4))
    _, payload = codec.PAYLOAD_WRITERS[layout.length].write(packet, 0, 1, 2, 3)
    decoded = _decoder(path)(payload)
    _same(decoded, msgpack.unpackb(payload))
    assert decoded["tradable"] is (segment != codec.INDEX_SEGMENT) and decoded["mode"] == mode


class Spy:
    """A fallback that records what it was given and answers as msgpack does."""

    def __init__(self) -> None:
        self.given: list[bytes] = []

    def __call__(self, payload: bytes) -> Any:
        self.given.append(payload)
        return msgpack.unpackb(payload)


@pytest.mark.parametrize("path", PATHS)
@given(payload=published(), data=st.data())
def test_a_payload_with_any_constant_byte_changed_goes_to_msgpack(path: str, payload: bytes, data) -> None:
    mask, _ = TEMPLATES[len(payload)].mask()
    at = data.draw(st.sampled_from([i for i, m in enumerate(mask) if m]))
    bits = mask[at] & data.draw(st.integers(1, 255).filter(lambda b: b & mask[at]))  # a byte it checks
    changed = bytearray(payload)
    changed[at] ^= bits
    spy = Spy()
    try:
        expected = msgpack.unpackb(bytes(changed))
    except Exception as exc:  # not msgpack any more: the decoder raises what msgpack raises
        with pytest.raises(type(exc)):
            _decoder(path, spy)(bytes(changed))
    else:
        _same(_decoder(path, spy)(bytes(changed)), expected)
    assert spy.given == [bytes(changed)]


@pytest.mark.parametrize("path", PATHS)
def test_payloads_of_other_publishers_and_versions_go_to_msgpack(path: str) -> None:
    packet = codec.encode_packet(Market(1).tick(408065, "full", 1764330000))
    (tick,), _ = codec.decode_frame(codec.encode_frame([packet]))
    ours = codec.PAYLOAD_WRITERS[len(packet)].write(packet, 0, 7, 1, 2)[1]
    stamped = tick | {"received_at_ns": 7, "seq": 1, "epoch": 2}
    others = [
        msgpack.packb(tick | {"received_at_ns": 7}),  # an older publisher: no seq, no epoch
        msgpack.packb(stamped),  # the same tick in msgpack's smallest encodings: another length
        ours.replace(b"\xa3seq", b"\xa3SEQ"),  # the same length, another key
        ours.replace(b"\xa5epoch\xcf", b"\xa5epoch\xcb"),  # the same length, epoch a float
    ]
    spy = Spy()
    decode = _decoder(path, spy)
    for payload in others:
        _same(decode(payload), msgpack.unpackb(payload))
    assert spy.given == others
    _same(decode(ours), msgpack.unpackb(ours))
    assert decode(ours) == stamped and len(spy.given) == len(others)  # ours: read by its template
    for junk in (b"\x93\x01\x02\x03", bytearray(b"\x91\x01"), memoryview(b"\xc3")):
        _same(decode(junk), msgpack.unpackb(junk))
    with pytest.raises(ValueError):  # msgpack's error for what is not msgpack
        decode(b"")


@pytest.mark.parametrize("path", PATHS)
def test_a_boolean_byte_other_than_msgpacks_two_goes_to_msgpack(path: str) -> None:
    template = TEMPLATES[codec.PAYLOAD_WRITERS[8].payload_length]
    (_, at), = [(code, offset) for code, offset in template.slots if code == "B"]
    good = codec.PAYLOAD_WRITERS[8].write(struct.pack(">II", 5 << 8 | 1, 100), 0, 1, 2, 3)[1]
    bad = good[:at] + b"\xc0" + good[at + 1 :]  # nil where the bool goes: still msgpack, not ours
    spy = Spy()
    _same(_decoder(path, spy)(bad), msgpack.unpackb(bad))
    assert spy.given == [bad]


@needs_compiled
@pytest.mark.parametrize(
    "program",
    [
        (8, b"\x00" * 8, b"\x00" * 8, [("v", "Q", 1)]),  # reads past the end
        (8, b"\x00" * 8, b"\x00" * 8, [("v", "I", 0), ("v", "I", 4)]),  # leaves two objects
        (8, b"\x00" * 8, b"\x00" * 8, [("v", "I", 0), ("l", 2)]),  # pops what it never pushed
        (8, b"\x00" * 8, b"\x00" * 8, [("v", "X", 0)]),  # an unknown code
        (8, b"\x00" * 7, b"\x00" * 8, [("v", "I", 0)]),  # a mask of another length
        (8, b"\x00" * 8, b"\x00" * 8, [("v", "I", 0), ("d", (1,))]),  # a key that is no str
    ],
)
def test_the_compiled_decoder_refuses_a_broken_program(program: tuple) -> None:
    from consumers import _speedups

    with pytest.raises(ValueError):
        _speedups.Decoder([program], msgpack.unpackb)


@needs_compiled
def test_a_build_that_refuses_the_programs_falls_back_to_python(monkeypatch, caplog) -> None:
    """A stale C build that does not take today's programs must not break every consumer's
    import: the Python decoder takes over, with a warning."""
    monkeypatch.setattr(payloads, "programs", lambda templates: [(8, b"", b"", [])])
    assert payloads.compiled_decoder() is None
    assert "decoding in Python" in caplog.text


def test_the_compiled_path_is_built_and_taken_wherever_it_can_be() -> None:
    """As for the encoder (tests/test_encoder.py): where a compiler is, and on CI, a decoder
    that failed to build fails the run instead of skipping its tests."""
    if SWITCHED_OFF:
        pytest.skip("KITEBUS_NO_SPEEDUPS=1: the pure-Python run")
    if _compiler() is None and not ON_CI:
        pytest.skip("no C compiler here: the pure-Python path is the one there is")
    assert COMPILED is not None, "consumers._speedups is not importable although it could be built"
    assert payloads.SPEEDUPS and payloads.decode.__self__.__class__.__module__ == "consumers._speedups"  # type: ignore[attr-defined]


def test_the_environment_switch_forces_the_python_path() -> None:
    code = "from consumers import payloads; print(payloads.SPEEDUPS, payloads.decode.__name__)"
    env = {**os.environ, "KITEBUS_NO_SPEEDUPS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "decode"]
