"""The sink's pure half (``publisher/backlog.py``) without a socket or a loop: batches,
conflation, lost and released tokens, rerouting and the counts, on one server and on a
two-node cluster, for any sequence of operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from config import Keys
from publisher.backlog import Backlog, Lanes, Queued
from rediswire import bus, resp
from tests.resp import parse_commands

KEYS = Keys("paper")
TOKENS = list(range(256 + 1, 256 * 40, 256))  # nse tokens, spread over slots
TWO_NODES = bus.Topology(("a", "b"), tuple(0 if slot < 8192 else 1 for slot in range(16384)))


ONE_SERVER = bus.Topology.single("one")


def _backlog() -> Backlog:
    return Backlog(KEYS, b"PUBLISH", Lanes(KEYS, ONE_SERVER))


def _ticks(backlog: Backlog, ticks: list[tuple[int, int]], upto: int = 0) -> Queued:
    """What the sink queues for an encoded frame: the PUBLISHes, the HSET fields, the cache."""
    payloads = [(token, b"p%d-%d" % (token, n)) for token, n in ticks]
    publishes = b"".join(resp.command(b"PUBLISH", KEYS.ticks(t), p) for t, p in payloads)
    fields = b"".join(resp.bulk(b"%d" % t) + resp.bulk(p) for t, p in payloads)
    for token, payload in payloads:
        backlog.cache[token] = payload
    tokens = tuple(t for t, _ in payloads)
    route = KEYS.ticks(tokens[0]).encode()
    item = Queued(publishes, fields, len(payloads), len(payloads), tokens, route=route, upto=upto)
    backlog.queue(item)
    return item


def _status(backlog: Backlog) -> None:
    key = KEYS.token_status.encode()
    backlog.queue(Queued(resp.command(b"HSET", key, b"1", b"live"), b"", 0, 0, (), other=1, route=key))


def _drain(backlog: Backlog, lanes: int = 1, batch_bytes: int = 256 << 10) -> list[list[list[bytes]]]:
    """Every batch until nothing is left, each as its commands per lane."""
    batches = []
    while backlog:
        batch, parts = backlog.take_batch(lanes, batch_bytes)
        per_lane = [parse_commands(part) for part in parts]
        assert [len(c) for c in per_lane] == batch.replies  # one reply per command
        assert batch.ticks == [sum(c[0] == b"PUBLISH" for c in cs) for cs in per_lane]
        batches.append(per_lane)
    return batches


def _counts_hold(backlog: Backlog) -> None:
    assert backlog.bytes == sum(item.size for item in backlog.pending)
    assert backlog.ticks == sum(item.ticks for item in backlog.pending)


def test_a_batch_is_the_publishes_in_order_then_one_hset_of_the_same_ticks() -> None:
    backlog = _backlog()
    a, b = TOKENS[:2]
    _ticks(backlog, [(a, 1), (b, 1)], upto=2)
    _status(backlog)
    _ticks(backlog, [(a, 2)], upto=3)
    batch, parts = backlog.take_batch(1, 256 << 10)
    (commands,) = [parse_commands(part) for part in parts]
    assert [c[:2] for c in commands[:4]] == [
        [b"PUBLISH", KEYS.ticks(a).encode()], [b"PUBLISH", KEYS.ticks(b).encode()],
        [b"HSET", KEYS.token_status.encode()], [b"PUBLISH", KEYS.ticks(a).encode()],
    ]  # fmt: skip
    hset = commands[4]
    assert hset[:2] == [b"HSET", KEYS.last.encode()]
    assert hset[2:] == [b"%d" % a, b"p%d-1" % a, b"%d" % b, b"p%d-1" % b, b"%d" % a, b"p%d-2" % a]
    assert len(commands) == 5 and backlog.bytes == backlog.ticks == 0 and not backlog
    # one entry per queued part and per added command: the ticks' ``upto``, 0 for the rest
    assert batch.replies == [5] and batch.ticks == [3]
    assert batch.positions == [[2, 0, 3, 0]]
    assert batch.commands == [[(2, (a, b)), (1, None), (1, (a,)), (1, None)]]


@settings(max_examples=200)
@given(st.lists(st.lists(st.sampled_from(TOKENS[:6]), min_size=1, max_size=5), min_size=1, max_size=30),
       st.integers(30, 600))  # fmt: skip
def test_batches_carry_every_tick_once_in_order_with_the_snapshot_behind_its_publishes(
    frames: list[list[int]], batch_bytes: int
) -> None:
    backlog = _backlog()
    sent = []
    for n, tokens in enumerate(frames):
        _ticks(backlog, [(t, n) for t in tokens])
        sent += [(t, n) for t in tokens]
        _counts_hold(backlog)
    published = []
    for (commands,) in _drain(backlog, batch_bytes=batch_bytes):
        publishes = [(int(c[1].rsplit(b":", 1)[1]), c[2]) for c in commands if c[0] == b"PUBLISH"]
        (hset,) = [c for c in commands if c[0] == b"HSET"]
        assert commands[-1] is hset  # the snapshot never runs ahead of the channel
        assert list(zip(map(int, hset[2::2]), hset[3::2], strict=True)) == publishes
        published += publishes
        _counts_hold(backlog)
    assert published == [(t, b"p%d-%d" % (t, n)) for t, n in sent]


@given(st.lists(st.lists(st.sampled_from(TOKENS[:8]), min_size=1, max_size=4), min_size=1, max_size=20),
       st.lists(st.lists(st.sampled_from(TOKENS[:8]), min_size=1, max_size=4), max_size=10))  # fmt: skip
def test_conflation_publishes_each_given_up_tokens_newest_once(
    before: list[list[int]], during: list[list[int]]
) -> None:
    backlog = _backlog()
    _status(backlog)
    for n, tokens in enumerate(before):
        _ticks(backlog, [(t, n) for t in tokens])
    backlog.conflate()
    assert backlog.conflating and backlog.ticks == 0 and len(backlog.pending) == 1  # the status stays
    _counts_hold(backlog)
    for n, tokens in enumerate(during, len(before)):  # read on while conflating: cached, given up
        payloads = [(t, b"p%d-%d" % (t, n)) for t in tokens]
        backlog.cache.update(payloads)
        backlog.give_up(len(tokens), tuple(tokens))
    given_up = sum(map(len, before)) + sum(map(len, during))
    tokens = {t for frame in before + during for t in frame}
    assert backlog.end_conflation(upto=7) == len(tokens)
    assert backlog.discarded == given_up and backlog.conflated == given_up - len(tokens)
    publishes = [c for batch in _drain(backlog) for c in batch[0] if c[0] == b"PUBLISH"]
    assert sorted(c[2] for c in publishes) == sorted(backlog.cache[t] for t in tokens)
    assert not backlog.conflating


def test_lost_tokens_go_again_unless_a_newer_tick_is_queued() -> None:
    backlog = _backlog()
    a, b = TOKENS[:2]
    _ticks(backlog, [(a, 1), (b, 1)])
    _drain(backlog)  # written, then the write failed: fate unknown
    _ticks(backlog, [(b, 2)])  # a newer tick of b is still queued
    backlog.lost |= {a, b}
    backlog.requeue_lost(upto=3)
    assert not backlog.lost
    ((commands,),) = _drain(backlog)
    publishes = [(c[1], c[2]) for c in commands if c[0] == b"PUBLISH"]
    assert publishes == [(KEYS.ticks(a).encode(), b"p%d-1" % a), (KEYS.ticks(b).encode(), b"p%d-2" % b)]


def test_lost_tokens_wait_for_the_end_of_conflation() -> None:
    backlog = _backlog()
    a, b = TOKENS[:2]
    _ticks(backlog, [(b, 1)])
    _drain(backlog)  # b's tick written, then the write failed: fate unknown
    _ticks(backlog, [(a, 1)])
    backlog.conflate()  # a given up; b never was
    backlog.lost.add(b)
    backlog.requeue_lost(upto=1)
    assert backlog.lost == {b} and backlog.ticks == 0  # nothing goes out while conflating
    assert backlog.end_conflation(upto=1) == 1  # a given up and published again
    assert not backlog.lost and backlog.ticks == 2
    publishes = sorted(c[2] for batch in _drain(backlog) for c in batch[0] if c[0] == b"PUBLISH")
    assert publishes == sorted([b"p%d-1" % a, b"p%d-1" % b])  # b's newest too, though not conflated


def test_a_released_token_is_deleted_only_behind_every_queued_tick_and_not_if_claimed_again() -> None:
    backlog = _backlog()
    a, b, c = TOKENS[:3]
    backlog.prune({a, b, c})
    for n in range(3):  # several parts: with batch_bytes=1 each goes in a batch of its own
        for token in (a, b, c):
            _ticks(backlog, [(token, n)])
    assert set(backlog.prune({a})) == {b, c} == backlog.released
    assert set(backlog.cache) == {a}
    backlog.cache[c] = b"again"  # c claimed and ticking again before the HDEL went out
    batches = _drain(backlog, batch_bytes=1)
    assert len(batches) == 9
    hdels = [(i, cmd) for i, (cs,) in enumerate(batches) for cmd in cs if cmd[0] == b"HDEL"]
    last_hset = max(i for i, (cs,) in enumerate(batches) for cmd in cs if cmd[0] == b"HSET")
    assert [cmd for _, cmd in hdels] == [
        [b"HDEL", KEYS.last.encode(), b"%d" % b],
        [b"HDEL", KEYS.token_status.encode(), b"%d" % b],
    ]
    assert {i for i, _ in hdels} == {last_hset} == {8}  # in the batch of the last tick, after its HSET
    assert not backlog.released


def test_a_released_token_is_deleted_at_once_when_nothing_is_queued() -> None:
    backlog = _backlog()
    a, b = TOKENS[:2]
    backlog.prune({a, b})
    _ticks(backlog, [(a, 1), (b, 1)])
    _drain(backlog)
    backlog.prune({a})
    batch, parts = backlog.take_batch(1, 256 << 10)
    assert parse_commands(parts[0]) == [
        [b"HDEL", KEYS.last.encode(), b"%d" % b],
        [b"HDEL", KEYS.token_status.encode(), b"%d" % b],
    ]
    assert batch.ticks == [0] and batch.positions == [[0, 0]]


def test_a_snapshot_rewrite_goes_first_and_holds_the_whole_cache() -> None:
    backlog = _backlog()
    a, b = TOKENS[:2]
    _ticks(backlog, [(a, 1), (b, 1)])
    _ticks(backlog, [(a, 2)])
    backlog.queue_snapshot()  # the cache: a's newest (2) and b's
    ((commands,),) = _drain(backlog)
    fields = commands[-1][2:]
    snapshot = [b"%d" % a, b"p%d-2" % a, b"%d" % b, b"p%d-1" % b]
    queued = [b"%d" % a, b"p%d-1" % a, b"%d" % b, b"p%d-1" % b, b"%d" % a, b"p%d-2" % a]
    assert fields == snapshot + queued  # behind it, the queued ticks leave a at its newest
    assert _backlog().queue_snapshot() is None and not _backlog()  # an empty cache queues nothing


def test_a_fresh_map_of_slots_forgets_the_lanes_of_tokens_worked_out_under_the_old() -> None:
    lanes = Lanes(KEYS, ONE_SERVER)
    token = next(t for t in TOKENS if TWO_NODES.node_of(KEYS.ticks(t).encode()) == 1)
    assert lanes.of_token(token) == 0 and lanes.count == 1  # cached under one server
    assert lanes.use(TWO_NODES)
    assert lanes.of_token(token) == 1 and lanes.count == 2


@given(st.lists(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4), min_size=1, max_size=15))
def test_on_a_cluster_every_command_goes_to_the_node_of_its_channel_or_key(frames: list[list[int]]) -> None:
    lanes = Lanes(KEYS, TWO_NODES)
    backlog = Backlog(KEYS, b"SPUBLISH", lanes)
    for n, tokens in enumerate(frames):  # the sink splits frames by node first: one part per node
        for lane in (0, 1):
            part = [(t, n) for t in tokens if lanes.of_token(t) == lane]
            if part:
                _ticks(backlog, part)
    _status(backlog)
    for batch in _drain(backlog, lanes=2):
        for lane, commands in enumerate(batch):
            for command in commands:
                assert TWO_NODES.node_of(command[1]) == lane


def test_a_part_split_by_a_new_map_of_slots_is_dropped_and_its_tokens_go_again() -> None:
    lanes = Lanes(KEYS, ONE_SERVER)
    backlog = Backlog(KEYS, b"SPUBLISH", lanes)
    mixed = next((a, b) for a in TOKENS for b in TOKENS if TWO_NODES.node_of(KEYS.ticks(a).encode())
                 != TWO_NODES.node_of(KEYS.ticks(b).encode()))  # fmt: skip
    _ticks(backlog, [(mixed[0], 1), (mixed[1], 1)])
    _ticks(backlog, [(mixed[0], 2)])
    assert lanes.use(TWO_NODES) and not lanes.use(TWO_NODES)
    assert backlog.reroute() == 2
    assert backlog.lost == set(mixed) and backlog.ticks == 1
    _counts_hold(backlog)


def test_clear_gives_back_the_ticks_it_forgot() -> None:
    backlog = _backlog()
    _ticks(backlog, [(TOKENS[0], 1), (TOKENS[1], 1)])
    assert backlog.clear() == 2 and not backlog and backlog.bytes == 0
