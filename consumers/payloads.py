"""Tick payloads -> tick dicts, by a decoder that knows the publisher's payload shapes.

The publisher writes every payload of one packet layout from one compiled template
(``kitewire/codec.py``, ``_PayloadWriter``): constant bytes (map headers, keys, the mode,
type markers) at fixed offsets and fixed-width values between them. A payload's length
therefore names its layout, and its constant bytes prove it is one: then one
``struct.unpack_from`` reads every value and a function generated from the layout's tree
builds the dict ``msgpack.unpackb`` would build (same keys in the same order, same values
and types). A payload it does not recognise (another length, or any constant byte
different: another publisher, an older version) goes to ``msgpack.unpackb``.

Two implementations with identical output, chosen at import as the encoder's are: the C
speed-up ``consumers._speedups`` (built where a compiler is present) and the pure-Python
one; ``KITEBUS_NO_SPEEDUPS=1`` forces the pure-Python one. ``decode`` is the faster.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from kitewire.codec import PAYLOAD_WRITERS

log = logging.getLogger("kitebus.payloads")

Tick = dict[str, Any]
Decoder = Callable[[bytes], Tick]
WIDTHS = {"I": 4, "H": 2, "d": 8, "Q": 8, "B": 1}
FALSE, TRUE = 0xC2, 0xC3  # msgpack's booleans: the "B" slot is the marker byte itself


@dataclass(frozen=True)
class Slot:
    """A value of the payload: the ``index``-th of its layout's slots."""

    index: int


@dataclass(frozen=True)
class Template:
    """One payload layout, as the decoders read it."""

    length: int
    constants: tuple[tuple[int, bytes], ...]  # (offset, bytes) every such payload holds
    slots: tuple[tuple[str, int], ...]  # (struct code, offset) of each value, in order
    tree: Any  # dicts (str keys), lists (depth levels), str constants and Slots

    def mask(self) -> tuple[bytes, bytes]:
        """(mask, expected): a payload of this layout has ``payload & mask == expected``
        byte for byte; a boolean's byte may be either of msgpack's two."""
        mask, expected = bytearray(self.length), bytearray(self.length)
        for offset, chunk in self.constants:
            mask[offset : offset + len(chunk)] = b"\xff" * len(chunk)
            expected[offset : offset + len(chunk)] = chunk
        for code, offset in self.slots:
            if code == "B":
                mask[offset], expected[offset] = 0xFE, FALSE & 0xFE
        return bytes(mask), bytes(expected)


def template_of(writer: Any) -> Template:
    """The template of one of the codec's payload writers."""
    constants, slots, pos = [], [], 0
    for chunk, (code, _) in zip(writer.chunks, [*writer.slot_specs, ("", 0)], strict=True):
        if chunk:
            constants.append((pos, chunk))
        pos += len(chunk)
        if code:
            slots.append((code, pos))
            pos += WIDTHS[code]
    assert pos == writer.payload_length
    count = iter(range(len(slots)))

    def walk(node: Any) -> Any:  # in the order codec._compile writes the payload
        if isinstance(node, tuple):
            return Slot(next(count))
        if isinstance(node, str):
            return node
        if all(isinstance(key, int) for key in node):
            return [walk(node[key]) for key in sorted(node)]
        return {key: walk(value) for key, value in node.items()}

    tree = walk(writer.shape)
    assert next(count, None) is None, "every slot is in the tree"
    return Template(pos, tuple(constants), tuple(slots), tree)


TEMPLATES = tuple(template_of(writer) for writer in PAYLOAD_WRITERS.values())


# --- pure Python -------------------------------------------------------------------------


def _expression(node: Any, bools: set[int]) -> str:
    """Python source building ``node`` from ``v0``, ``v1``, …, the payload's values."""
    if isinstance(node, Slot):
        return f"(v{node.index} == {TRUE})" if node.index in bools else f"v{node.index}"
    if isinstance(node, str):
        return repr(node)
    if isinstance(node, list):
        return "[" + ", ".join(_expression(item, bools) for item in node) + "]"
    return "{" + ", ".join(f"{key!r}: {_expression(value, bools)}" for key, value in node.items()) + "}"


def _python_function(template: Template, fallback: Decoder) -> Decoder:
    """The decoder of payloads of ``template.length`` bytes: this layout's values read by
    one struct, or ``fallback`` for a payload whose constant bytes differ."""
    fmt, pos = ">", 0
    for code, offset in template.slots:
        fmt += f"{offset - pos}x{code}"
        pos = offset + WIDTHS[code]
    fmt += f"{template.length - pos}x"
    mask, expected = (int.from_bytes(b, "big") for b in template.mask())
    bools = {i for i, (code, _) in enumerate(template.slots) if code == "B"}
    source = (
        "def decode(payload):\n"
        "    if from_bytes(payload, 'big') & MASK != EXPECTED:\n"
        "        return fallback(payload)\n"
        f"    {''.join(f'v{i}, ' for i in range(len(template.slots)))}= unpack_from(payload)\n"
        f"    return {_expression(template.tree, bools)}\n"
    )
    scope = {
        "from_bytes": int.from_bytes, "MASK": mask, "EXPECTED": expected, "fallback": fallback,
        "unpack_from": struct.Struct(fmt).unpack_from,
    }  # fmt: skip
    exec(compile(source, f"<payload decoder {template.length}>", "exec"), scope)
    return scope["decode"]  # type: ignore[no-any-return]


def python_decoder(templates: Iterable[Template] = TEMPLATES, fallback: Decoder = msgpack.unpackb) -> Decoder:
    """The pure-Python decoder: ``decode(payload) -> tick``."""
    by_length = {t.length: _python_function(t, fallback) for t in templates}.get

    def decode(payload: bytes) -> Tick:
        layout = by_length(len(payload))
        return fallback(payload) if layout is None else layout(payload)

    return decode


# --- C -------------------------------------------------------------------------------------


def _ops(node: Any, slots: tuple[tuple[str, int], ...], out: list[tuple[Any, ...]]) -> None:
    """``node`` as the C decoder's stack program, in postfix: ``("v", code, offset)`` and
    ``("c", constant)`` push a value, ``("d", keys)`` and ``("l", n)`` pop their items."""
    if isinstance(node, Slot):
        out.append(("v", *slots[node.index]))
    elif isinstance(node, str):
        out.append(("c", node))
    elif isinstance(node, list):
        for item in node:
            _ops(item, slots, out)
        out.append(("l", len(node)))
    else:
        for value in node.values():
            _ops(value, slots, out)
        out.append(("d", tuple(node)))


def programs(templates: Iterable[Template] = TEMPLATES) -> list[tuple[int, bytes, bytes, list]]:
    """The templates in the shape the C decoder takes: (length, mask, expected, ops)."""
    out = []
    for template in templates:
        ops: list[tuple[Any, ...]] = []
        _ops(template.tree, template.slots, ops)
        out.append((template.length, *template.mask(), ops))
    return out


def compiled_decoder(
    templates: Iterable[Template] = TEMPLATES, fallback: Decoder = msgpack.unpackb
) -> Decoder | None:
    """The C decoder, or None where it was not built (or is switched off)."""
    if os.environ.get("KITEBUS_NO_SPEEDUPS", "") not in ("", "0"):
        return None
    try:
        from consumers import _speedups
    except ImportError:
        return None
    try:
        return _speedups.Decoder(programs(templates), fallback).decode  # type: ignore[no-any-return]
    except (ValueError, TypeError) as exc:  # a stale build that refuses today's programs
        log.warning("the C tick decoder refused the payload programs (%s); decoding in Python", exc)
        return None


_COMPILED = compiled_decoder()
SPEEDUPS = _COMPILED is not None  # which path ``decode`` takes, for benchmarks
decode: Decoder = _COMPILED or python_decoder()
