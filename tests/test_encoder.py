"""The hot call, frame -> RESP: every path byte-identical, and right against the official parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from datetime import datetime

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kiteconnect import KiteTicker

from kitewire import codec, encoder
from tests.resp import parse_commands
from tests.strategies import ticks

OFFICIAL = KiteTicker("oracle", "oracle")
PREFIX = b"kite:ticks:"
EPOCH = 1764330000123
COMPILED = encoder.compiled_encoder(PREFIX, epoch=EPOCH)
ENCODERS = {"python": encoder.PyFrameEncoder(PREFIX, epoch=EPOCH), "compiled": COMPILED}
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the C speed-up is not built here")
SWITCHED_OFF = os.environ.get("KITEBUS_NO_SPEEDUPS", "") not in ("", "0")  # as kitewire/encoder.py reads it
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _compiler() -> str | None:
    """The C compiler pip would build the speed-up with, if there is one."""
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(command.split()[0])


def _fresh(path: str) -> encoder.Encoder:
    """A new encoder of that path: its sequence numbers start at 1."""
    if path == "python":
        return encoder.PyFrameEncoder(PREFIX, epoch=EPOCH)
    return encoder.compiled_encoder(PREFIX, epoch=EPOCH)  # type: ignore[return-value]


both_paths = pytest.mark.parametrize(
    "path", ["python", pytest.param("compiled", marks=needs_compiled)]
)



def _packets() -> st.SearchStrategy[bytes]:
    """Any bytes of a known packet length: every u32 value, zero closes, odd segments."""
    return st.sampled_from(sorted(codec.LAYOUTS)).flatmap(lambda n: st.binary(min_size=n, max_size=n))


def _epoch(value: object) -> object:
    return int(value.timestamp()) if isinstance(value, datetime) else value


@given(st.lists(ticks(), min_size=1, max_size=10), st.integers(0, 2**64 - 1))
@both_paths
def test_publishes_carry_the_payloads_in_frame_order(path: str, batch: list[dict], now: int) -> None:
    frame = codec.encode_frame(codec.encode_packet(tick) for tick in batch)
    latest: dict[int, bytes] = {}
    enc = _fresh(path)
    enc.encode(frame, now, {})  # the second time through, every token's seq goes on from there
    resp, fields, count, malformed = enc.encode(frame, now, latest)
    assert (count, malformed) == (len(batch), 0)
    commands = parse_commands(resp)
    seen: dict[int, int] = {}
    expected = []
    for tick in batch:
        token = tick["instrument_token"]
        seen[token] = seen.get(token, 0) + 1
        seq = sum(t["instrument_token"] == token for t in batch) + seen[token]
        expected.append(tick | {"received_at_ns": now, "seq": seq, "epoch": EPOCH})
    assert [c[0] for c in commands] == [b"PUBLISH"] * len(batch)
    assert [c[1] for c in commands] == [b"kite:ticks:%d" % t["instrument_token"] for t in batch]
    assert [msgpack.unpackb(c[2]) for c in commands] == expected
    assert latest == {int(c[1].rsplit(b":", 1)[1]): c[2] for c in commands}  # the last of each token
    (hset,) = parse_commands(b"*%d\r\n$4\r\nHSET\r\n$9\r\nkite:last\r\n" % (2 + 2 * count) + fields)
    assert hset[2:] == [v for c in commands for v in (c[1].rsplit(b":", 1)[1], c[2])]


@settings(max_examples=300)
@given(st.lists(_packets(), min_size=1, max_size=8))
@both_paths
def test_payloads_agree_with_the_official_parser_on_any_packet_bytes(path: str, packets: list[bytes]) -> None:
    frame = codec.encode_frame(packets)
    resp, _, _, _ = ENCODERS[path].encode(frame, 7, {})
    mine = [msgpack.unpackb(c[2]) for c in parse_commands(resp)]
    for tick in mine:
        del tick["received_at_ns"], tick["seq"], tick["epoch"]
    official = [{k: _epoch(v) for k, v in t.items()} for t in OFFICIAL._parse_binary(frame)]
    assert mine == official


@needs_compiled
@settings(max_examples=500)
@given(st.lists(_packets(), max_size=8), st.data())
def test_compiled_and_python_are_byte_identical_even_on_broken_frames(packets, data) -> None:
    frame = bytearray(codec.encode_frame(packets))
    if frame and data.draw(st.booleans()):
        frame = frame[: data.draw(st.integers(0, len(frame)))]  # truncated anywhere
    if len(frame) >= 2 and data.draw(st.booleans()):
        frame[:2] = data.draw(st.integers(0, 2**16 - 1)).to_bytes(2, "big")  # a lying count
    frame = bytes(frame) + data.draw(st.binary(max_size=20))  # trailing garbage
    latest_py: dict[int, bytes] = {}
    latest_c: dict[int, bytes] = {}
    python, compiled = _fresh("python"), _fresh("compiled")
    for _ in range(2):  # twice: the sequence numbers go on identically
        assert python.encode(frame, 99, latest_py) == compiled.encode(frame, 99, latest_c)
    assert latest_py == latest_c
    assert python.encode(frame, 99, {})[2:] == (
        len(codec.scan_frame(frame)[0]),
        codec.scan_frame(frame)[1],
    )


@given(st.binary(max_size=600))
@both_paths
def test_arbitrary_bytes_never_raise(path: str, frame: bytes) -> None:
    resp, fields, count, malformed = ENCODERS[path].encode(frame, 1, {})
    assert len(parse_commands(resp)) == count and count >= 0 and malformed >= 0
    assert fields.count(b"$") >= 2 * count


@both_paths
def test_malformed_frames_count_the_bad_packets_and_keep_the_good(path: str) -> None:
    good = codec.encode_packet({"instrument_token": 408065, "mode": "ltp", "last_price": 12.5})
    cases = {
        codec.HEARTBEAT: (0, 0),
        b"": (0, 0),
        codec.encode_frame([good, b"\x01" * 13, good]): (2, 1),  # unknown length between two good
        (500).to_bytes(2, "big") + codec.encode_frame([good])[2:]: (1, 499),  # count too large
        (1).to_bytes(2, "big") + (184).to_bytes(2, "big") + b"\x00" * 20: (0, 1),  # length too large
    }
    for frame, expected in cases.items():
        assert ENCODERS[path].encode(frame, 1, {})[2:] == expected


def test_the_channel_prefix_and_command_are_the_callers() -> None:
    tick = {"instrument_token": 7, "mode": "ltp", "last_price": 1.0}
    frame = codec.encode_frame([codec.encode_packet(tick)])
    for make in (encoder.PyFrameEncoder, encoder.compiled_encoder):
        built = make(b"paper:t:", b"SPUBLISH")
        if built is not None:
            ((command, channel, payload),) = parse_commands(built.encode(frame, 1, {})[0])
            assert (command, channel) == (b"SPUBLISH", b"paper:t:7")
            assert msgpack.unpackb(payload)["last_price"] == 1.0


def test_the_compiled_path_is_built_and_taken_wherever_it_can_be() -> None:
    """Where a compiler is, and on CI, a speed-up that failed to build fails the run: its
    tests would only skip. ``KITEBUS_NO_SPEEDUPS=1`` (scripts/test-no-speedups) is the way
    to run without it."""
    if SWITCHED_OFF:
        pytest.skip("KITEBUS_NO_SPEEDUPS=1: the pure-Python run")
    if _compiler() is None and not ON_CI:
        pytest.skip("no C compiler here: the pure-Python path is the one there is")
    assert COMPILED is not None, (
        "kitewire._speedups is not importable although it could be built "
        f"(compiler {_compiler()}, CI={os.environ.get('CI', '')!r}): see pip's warning in "
        "`.venv/bin/python -m pip install -e .` or set KITEBUS_NO_SPEEDUPS=1 to run without it"
    )
    assert encoder.SPEEDUPS
    assert type(encoder.frame_encoder(PREFIX)).__module__ == "kitewire._speedups"  # the publisher's


def test_the_environment_switch_forces_the_python_path() -> None:
    code = "from kitewire import encoder; print(encoder.SPEEDUPS, type(encoder.frame_encoder(b'x')).__name__)"
    env = {**os.environ, "KITEBUS_NO_SPEEDUPS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PyFrameEncoder"]


def _ltp(*tokens: int) -> bytes:
    return codec.encode_frame(
        codec.encode_packet({"instrument_token": t, "mode": "ltp", "last_price": 1.0}) for t in tokens
    )


def _seqs(resp: bytes) -> list[tuple[int, int]]:
    return [(m["instrument_token"], m["seq"]) for m in (msgpack.unpackb(c[2]) for c in parse_commands(resp))]


@both_paths
def test_packets_of_unclaimed_tokens_are_counted_and_not_encoded(path: str) -> None:
    enc, latest = _fresh(path), {}
    claimed = {1, 3}
    enc.set_claimed(claimed)
    resp, _, count, malformed = enc.encode(_ltp(1, 2, 3, 2), 5, latest)
    assert (count, malformed, enc.unclaimed) == (2, 0, 2)
    assert _seqs(resp) == [(1, 1), (3, 1)] and set(latest) == {1, 3}
    assert enc.tracked() == 2  # no sequence number was given to 2
    claimed.add(2)  # the container is kept by reference: a claim counts at once
    assert _seqs(enc.encode(_ltp(2), 6, latest)[0]) == [(2, 1)] and enc.unclaimed == 2
    enc.set_claimed(None)  # all tokens again
    assert enc.encode(_ltp(9), 7, latest)[2] == 1 and enc.unclaimed == 2


@both_paths
def test_a_claim_dropped_from_the_books_dict_stops_its_packets_at_once(path: str) -> None:
    """The book's placement is a dict; the compiled path skips the lookup of a token found
    claimed while the dict is unchanged, so any change must be seen at the next packet."""
    enc, latest = _fresh(path), {}
    claimed = {1: 0, 2: 1, 3: 2}
    enc.set_claimed(claimed)
    for _ in range(3):  # claimed under this version of the dict
        assert enc.encode(_ltp(1, 2, 3), 5, latest)[2] == 3
    del claimed[2]  # released, before the encoder is told (the monitor's prune comes later)
    resp, _, count, _ = enc.encode(_ltp(1, 2, 3), 6, latest)
    assert (count, enc.unclaimed) == (2, 1) and _seqs(resp) == [(1, 4), (3, 4)]
    claimed[2] = 0  # claimed again
    claimed[1] = 2  # moved to another connection: still claimed
    assert _seqs(enc.encode(_ltp(1, 2, 3), 7, latest)[0]) == [(1, 5), (2, 4), (3, 5)]
    claimed.clear()
    assert enc.encode(_ltp(1, 2, 3), 8, latest)[2] == 0 and enc.unclaimed == 4
    enc.set_claimed({1: 0})  # another dict altogether: what the last one said counts no more
    assert _seqs(enc.encode(_ltp(1, 2, 3), 9, latest)[0]) == [(1, 6)] and enc.unclaimed == 6


@both_paths
def test_release_prunes_the_sequence_table_and_a_token_claimed_again_starts_at_one(path: str) -> None:
    enc = _fresh(path)
    tokens = list(range(1, 5001))  # past the C table's first size: it grows, then shrinks
    for start in range(0, len(tokens), 500):
        enc.encode(_ltp(*tokens[start : start + 500]), 1, {})
    enc.encode(_ltp(7, 4000), 1, {})
    assert enc.tracked() == 5000
    enc.release(t for t in tokens if t not in (7, 4000))
    assert enc.tracked() == 2
    enc.release([123456789, 2**40])  # unknown and impossible tokens: nothing happens
    assert enc.tracked() == 2
    # the ones kept go on; a released one starts again at 1
    assert _seqs(enc.encode(_ltp(7, 4000, 8), 1, {})[0]) == [(7, 3), (4000, 3), (8, 1)]
    enc.release(tokens)
    assert enc.tracked() == 0


def _home(token: int, mask: int = 1023) -> int:
    """The C table's home slot of a token (at its first size by default)."""
    from kitewire import _speedups

    return _speedups.home_slot(token, mask)  # type: ignore[no-any-return]


# with the C path: 16 tokens with one home slot and 16 with another, long probe chains to
# delete from; without it the test is skipped and any tokens do
_COLLIDING = (
    [t for t in range(1, 200_000) if _home(t) == 5][:16]
    + [t for t in range(1, 200_000) if _home(t) == 6][:16]
    if COMPILED is not None
    else list(range(1, 33))
)


@needs_compiled
def test_tokens_of_one_segment_spread_over_the_table() -> None:
    """Tokens differ in their high bits (the segment is the low byte): none may cluster."""
    tokens = [(n << 8) | 1 for n in range(1, 9001)]
    homes = {_home(t, 16383) for t in tokens}  # the table's size for 9,000 tokens
    assert len(homes) > 0.7 * len(tokens)  # a multiplicative hash of the low bits: 64 homes
    enc = _fresh("compiled")
    frame = _ltp(*tokens[:500])
    assert _seqs(enc.encode(frame, 1, {})[0]) == [(t, 1) for t in tokens[:500]]


@both_paths
def test_a_cached_payload_someone_holds_is_never_changed(path: str) -> None:
    """The compiled path overwrites a token's cached payload in place when nothing else
    holds it; a payload the sink (or anyone) still holds must stay as it was."""
    enc, latest = _fresh(path), {}
    enc.encode(_ltp(5), 1, latest)
    held = latest[5]
    copy = bytearray(held)  # bytes(held) would be held itself
    enc.encode(_ltp(5), 2, latest)
    assert held == copy and msgpack.unpackb(held)["seq"] == 1
    assert msgpack.unpackb(latest[5])["seq"] == 2
    del held
    hash(latest[5])  # bytes cache their hash: an overwrite in place must forget it
    enc.encode(_ltp(5), 3, latest)
    newest = latest[5]
    assert msgpack.unpackb(newest)["seq"] == 3 and msgpack.unpackb(newest)["received_at_ns"] == 3
    assert hash(newest) == hash(bytes(bytearray(newest)))  # the cached hash was reset with the bytes


@needs_compiled
@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from(_COLLIDING), max_size=12)), max_size=30))
def test_compiled_and_python_agree_across_releases_and_claims(steps) -> None:
    """Deletion from the C table's open addressing keeps every other token's place."""
    python, compiled = _fresh("python"), _fresh("compiled")
    claimed: dict[int, int] = dict.fromkeys(_COLLIDING[::2], 0)  # a dict, as the book's placement is
    for enc in (python, compiled):
        enc.set_claimed(claimed)
    for release, tokens in steps:
        if release:
            for enc in (python, compiled):
                enc.release(tokens)
            for token in tokens[:2]:
                if claimed.pop(token, None) is None:
                    claimed[token] = 0
        else:
            frame = _ltp(*tokens)
            assert python.encode(frame, 3, {}) == compiled.encode(frame, 3, {})
        assert (python.tracked(), python.unclaimed) == (compiled.tracked(), compiled.unclaimed)


@both_paths
def test_a_payload_taken_out_of_the_cache_is_never_changed(path: str) -> None:
    """The compiled path skips the cache dict while the dict has not changed since its own
    last write; a payload someone popped, or replaced, in between must stay as it was, and
    the dict must get the newest."""
    enc, latest = _fresh(path), {}
    enc.encode(_ltp(5, 6), 1, latest)
    popped = latest.pop(5)  # the popper's reference and the encoder's: no one else's
    enc.encode(_ltp(5, 6), 2, latest)
    assert msgpack.unpackb(popped)["seq"] == 1
    assert [msgpack.unpackb(latest[t])["seq"] for t in (5, 6)] == [2, 2]
    replaced = latest[6]
    latest[6] = b"someone else's"
    enc.encode(_ltp(6), 3, latest)
    assert msgpack.unpackb(replaced)["seq"] == 2 and msgpack.unpackb(latest[6])["seq"] == 3
    other: dict[int, bytes] = {}
    enc.encode(_ltp(6), 4, other)  # another dict: neither is written through the other
    assert msgpack.unpackb(latest[6])["seq"] == 3 and msgpack.unpackb(other[6])["seq"] == 4


class _Meddler:
    """Claims every token, and on its ``when``-th question runs ``act``: Python code run in
    the middle of encode(), as a garbage collector's callback or a finaliser can be."""

    def __init__(self, when: int, act) -> None:
        self.asked, self.when, self.act = 0, when, act

    def __contains__(self, token: object) -> bool:
        self.asked += 1
        if self.asked == self.when:
            self.act()
        return True


@both_paths
def test_a_payload_taken_out_of_the_cache_during_a_call_is_never_changed(path: str) -> None:
    """Python code run inside encode() that pops a payload and keeps it must not have its
    change taken for the encoder's own: the payload stays, the dict gets the newest."""
    enc, latest = _fresh(path), {}
    enc.encode(_ltp(5, 6), 1, latest)
    enc.encode(_ltp(5, 6), 2, latest)  # both cached and known to be the dict's
    taken: list[tuple[bytes, bytearray]] = []
    enc.set_claimed(_Meddler(2, lambda: taken.append(_take(latest, "pop", 5))))
    enc.encode(_ltp(5, 6, 5), 3, latest)  # 5 is popped while 6 is asked about
    enc.encode(_ltp(5, 6), 4, latest)
    (popped, copy), = taken
    assert popped == copy and msgpack.unpackb(popped)["seq"] == 3  # the first 5 of the frame
    assert [msgpack.unpackb(latest[t])["seq"] for t in (5, 6)] == [5, 4]


@both_paths
def test_a_garbage_collector_callback_that_touches_the_cache_changes_nothing_it_holds(path: str) -> None:
    """The same, from a gc callback: any allocation of a container inside encode() (its
    result's tuple, say) may run one."""
    import gc

    enc, latest = _fresh(path), {}
    for at in (1, 2):
        enc.encode(_ltp(*range(1, 7)), at, latest)
    taken: list[tuple[bytes, bytearray]] = []
    calling = [False]  # set only around the encode() call, which allocates nothing else here
    outside: list[bool] = []  # collections that came outside encode(): the test would prove nothing

    def meddle(phase: str, info: dict) -> None:
        if phase == "start" and not taken:
            outside.append(not calling[0])  # (an assert here would go to the unraisable hook)
            taken.append(_take(latest, "pop", 3))
            taken.append(_take(latest, "replace", 4))

    frame = _ltp(*range(1, 7))  # made before: the first collection is to come inside encode()
    # 4-tuples held, so the result's tuple cannot come from the free list (which the
    # collector does not count) and triggers a collection after all the call's writes
    emptied = [tuple(range(i, i + 4)) for i in range(3000)]
    gc.callbacks.append(meddle)
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a collection at (nearly) every allocation of a container
    results = []  # kept, so each result's tuple counts towards the next collection
    try:
        for at in range(3, 8):
            calling[0] = True
            results.append(enc.encode(frame, at, latest))
            calling[0] = False
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(meddle)
    assert taken and outside == [False] and all(value == copy for value, copy in taken)
    assert len(emptied) == 3000
    assert [msgpack.unpackb(latest[t])["seq"] for t in range(1, 7)] == [7] * 6


@both_paths
def test_a_frame_changed_during_the_call_is_encoded_as_it_was(path: str) -> None:
    """A bytearray frame rewritten by Python code run inside encode() (a longer packet
    length, say) must not be read twice: the output is the frame's as it was passed."""
    original = _ltp(5, 6, 7)
    expected = _fresh(path).encode(original, 1, {})
    frame = bytearray(original)

    def rewrite() -> None:  # asked about the first packet: the others are still to be read
        frame[12:14] = (184).to_bytes(2, "big")  # the second claims to be a full one
        frame[26:30] = (99).to_bytes(4, "big")  # the third's token

    enc = _fresh(path)
    enc.set_claimed(_Meddler(1, rewrite))
    assert enc.encode(frame, 1, {}) == expected


@both_paths
def test_a_finaliser_run_by_the_encoders_own_insertion_changes_nothing_it_holds(path: str) -> None:
    """The encoder's own insertion can drop a value whose finaliser takes the payload just
    put in; that change must not be taken for the encoder's own either."""
    enc, latest = _fresh(path), {}
    enc.encode(_ltp(5), 1, latest)
    taken: list[tuple[bytes, bytearray]] = []

    class Finalised:
        def __del__(self) -> None:
            taken.append(_take(latest, "pop", 5))

    latest[5] = Finalised()  # type: ignore[assignment]
    enc.encode(_ltp(5), 2, latest)  # replaces it: its finaliser pops the payload of seq 2
    enc.encode(_ltp(5), 3, latest)
    (popped, copy), = taken
    assert popped == copy and msgpack.unpackb(popped)["seq"] == 2
    assert msgpack.unpackb(latest[5])["seq"] == 3


@both_paths
def test_a_claim_dropped_during_the_call_stops_the_rest_of_the_frame(path: str) -> None:
    """The claims dict can change inside encode() too (here a finaliser the cache write
    runs); the packets after that must see it."""
    enc, latest = _fresh(path), {}
    claimed = {1: 0, 2: 0}
    enc.set_claimed(claimed)
    enc.encode(_ltp(1, 2), 1, latest)  # both found claimed under this version of the dict

    class Finalised:
        def __del__(self) -> None:
            claimed.pop(2)

    latest[1] = Finalised()  # type: ignore[assignment]
    resp, _, count, _ = enc.encode(_ltp(1, 2), 2, latest)
    assert (count, enc.unclaimed) == (1, 1) and _seqs(resp) == [(1, 2)]


@both_paths
def test_code_run_inside_encode_cannot_call_the_encoder(path: str) -> None:
    """Python code encode() runs may not change the encoder under it (the compiled one keeps
    pointers into its table across such code): a clear error, and the encoder goes on."""
    enc, latest = _fresh(path), {}
    enc.encode(_ltp(5), 1, latest)
    calls = {
        "release": lambda: enc.release([5]),
        "encode": lambda: enc.encode(_ltp(5), 9, {}),
        "set_claimed": lambda: enc.set_claimed(None),
        "__init__": lambda: (
            enc.__init__(encoder._programs(), b"PUBLISH", PREFIX)  # type: ignore[misc]
            if path == "compiled"
            else enc.__init__(PREFIX)  # type: ignore[misc]
        ),
    }
    for call in calls.values():
        enc.set_claimed(_Meddler(1, call))
        with pytest.raises(RuntimeError, match="inside its own encode"):
            enc.encode(_ltp(5, 6), 2, latest)
    enc.set_claimed(None)
    assert _seqs(enc.encode(_ltp(5), 3, latest)[0]) == [(5, 2)] and enc.tracked() == 1


class _Collider:
    """A key with a token's hash: first in that token's probe sequence, so every lookup of
    the token in the dict asks it, and it counts the questions."""

    def __init__(self, token: int) -> None:
        self.token, self.asked = token, 0

    def __hash__(self) -> int:
        return self.token

    def __eq__(self, other: object) -> bool:
        self.asked += 1
        return False


@needs_compiled
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="no dict version tag to trust there")
def test_the_compiled_path_does_not_look_in_unchanged_dicts() -> None:
    """The point of the version tags: a steady token's claim and cached payload are not
    looked up again while neither dict changes (and are, once one does)."""
    enc, latest = _fresh("compiled"), {}
    in_latest, in_claimed = _Collider(5), _Collider(5)
    latest[in_latest] = b"first in 5's way"  # type: ignore[index]
    claimed = {in_claimed: 0, 5: 0}
    enc.set_claimed(claimed)
    for at in (1, 2):  # the insertion, then the lookup that finds the encoder's own payload
        enc.encode(_ltp(5), at, latest)
    looked = (in_latest.asked, in_claimed.asked)
    for at in range(3, 10):
        enc.encode(_ltp(5), at, latest)
    assert looked[0] >= 1 and looked[1] >= 1 and (in_latest.asked, in_claimed.asked) == looked
    assert msgpack.unpackb(latest[5])["seq"] == 9
    latest[6] = b"a change"
    claimed[6] = 0
    enc.encode(_ltp(5), 10, latest)
    assert in_latest.asked > looked[0] and in_claimed.asked > looked[1]


_CACHE_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("encode"), st.lists(st.integers(1, 6), max_size=8), st.booleans()),
        st.tuples(st.sampled_from(["pop", "hold", "replace", "release"]), st.integers(1, 6), st.booleans()),
    ),
    max_size=40,
)


def _take(cache: dict[int, bytes], step: str, token: int) -> tuple[bytes, bytearray]:
    """Pop, hold or replace a token's cached payload: the object taken and a copy of it."""
    value = cache.pop(token) if step == "pop" else cache[token]
    if step == "replace":
        cache[token] = b"replaced"
    return value, bytearray(value)  # a copy: bytes(value) is value itself


@needs_compiled
@settings(max_examples=300)
@given(_CACHE_STEPS)
def test_compiled_and_python_keep_the_same_cache_whatever_else_touches_it(steps) -> None:
    """Whatever happens to the cache dict between calls (a pop, a held value, a value
    replaced, a release, another dict), both paths leave the same dicts, and every bytes
    object anyone took out of them keeps its value."""
    paths = {name: (_fresh(name), {}, {}) for name in ("python", "compiled")}
    held: dict[str, list[tuple[bytes, bytearray]]] = {name: [] for name in paths}
    for step, arg, flag in steps:
        for name, (enc, latest, other) in paths.items():
            target = other if flag else latest
            if step == "encode":
                enc.encode(_ltp(*arg), 9, target)
            elif step == "release":
                enc.release([arg])
            elif arg in target:
                held[name].append(_take(target, step, arg))  # no local name keeps it alive
        python, compiled = paths["python"], paths["compiled"]
        assert (python[1], python[2]) == (compiled[1], compiled[2])
        for name in paths:
            assert all(value == copy for value, copy in held[name])


@needs_compiled
def test_the_compiled_encoder_refuses_a_program_that_reads_outside_its_packet() -> None:
    """encode() trusts its programs' offsets, so the constructor checks every one."""
    from kitewire import _speedups

    programs = encoder._programs()
    length = min(programs)  # ltp: 8 bytes
    offsets, prices, *rest = programs[length]
    bad = {
        "a field past the packet's end": ([*offsets[:-1], (length - 2, 4)], prices),
        "a field at a negative offset": ([*offsets[:-1], (-1, 4)], prices),
        "a field 3 bytes wide": ([*offsets[:-1], (offsets[-1][0], 3)], prices),
        "the token not first": ([offsets[-1], offsets[0]], prices),
        "a price that is no field": (offsets, [len(offsets)]),
        "a field so far out its end overflows": ([*offsets[:-1], (2**31 - 2, 4)], prices),
        "no fields at all": ([], []),
    }
    for why, (bad_offsets, bad_prices) in bad.items():
        with pytest.raises(ValueError):
            _speedups.Encoder({length: (bad_offsets, bad_prices, *rest)}, b"PUBLISH", PREFIX)
            pytest.fail(why)
    assert _speedups.Encoder({length: (offsets, prices, *rest)}, b"PUBLISH", PREFIX).tracked() == 0
