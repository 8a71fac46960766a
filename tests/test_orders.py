"""The order updates' pure core: one update once per account, in Kite's order, whichever
sockets carried it (publisher/orders.py)."""

from __future__ import annotations

import json
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from publisher.orders import Every, OrderMerge, Update, prepare


def order(order_id: str = "220303000308932", status: str = "OPEN", filled: int = 0, **more: object) -> dict:
    """An order update shaped as Kite's (a few of its fields)."""
    return {
        "order_id": order_id, "status": status, "tradingsymbol": "SBIN", "instrument_token": 779521,
        "quantity": 10, "filled_quantity": filled, "pending_quantity": 10 - filled, "average_price": 470.5,
        "meta": {}, "tag": None, **more,
    }  # fmt: skip


def test_an_update_carries_kites_object_as_text_and_as_msgpack_with_its_account() -> None:
    data = order(status="UPDATE", filled=4, tradingsymbol="NIFTY25JANFUT ₹")
    update = prepare("b", data)
    assert update.fields() == {
        "account": "b", "order_id": "220303000308932", "status": "UPDATE", "data": update.text,
    }  # fmt: skip
    assert json.loads(update.text) == data
    assert list(json.loads(update.text)) == list(data)  # Kite's own order of fields
    assert msgpack.unpackb(update.packed) == {**data, "account": "b"}


def test_the_fingerprint_is_the_content_so_partial_fills_differ_and_key_order_does_not() -> None:
    first = prepare("a", order(status="UPDATE", filled=3))
    second = prepare("a", order(status="UPDATE", filled=7))
    assert first.fingerprint != second.fingerprint
    shuffled = dict(reversed(list(order(status="UPDATE", filled=3).items())))
    assert prepare("a", shuffled).fingerprint == first.fingerprint


def test_an_order_id_given_as_a_number_is_text_in_the_stream_and_a_missing_status_is_empty() -> None:
    data = {"order_id": 12345}
    assert prepare("default", data).fields()["order_id"] == "12345"
    assert prepare("default", data).status == ""


def test_what_msgpack_cannot_carry_is_refused_before_anything_is_written() -> None:
    with pytest.raises(ValueError, match="cannot be encoded"):
        prepare("default", order(quantity=10**30))


def _updates(n: int, account: str = "default") -> list[Update]:
    """n updates of a few orders, with partial fills (same status, other figures)."""
    out = []
    for i in range(n):
        out.append(prepare(account, order(order_id=str(1000 + i % 3), status="UPDATE", filled=i)))
    return out


def _merge(sockets: int = 3, **options: float) -> OrderMerge:
    merge = OrderMerge(**options)  # type: ignore[arg-type]
    for socket in range(sockets):
        merge.opened("default", socket)
    return merge


def test_every_socket_bringing_every_update_gives_each_once_in_order() -> None:
    merge, updates = _merge(), _updates(20)
    out: list[Update] = []
    queues = [list(updates) for _ in range(3)]
    rng = random.Random(3)
    while any(queues):
        socket = rng.choice([i for i, q in enumerate(queues) if q])
        out += merge.received(socket, queues[socket].pop(0), 0.0)
    assert out == updates
    assert merge.duplicates == 40 and merge.held == 0


def test_a_socket_back_from_a_cut_never_puts_an_update_ahead_of_one_it_missed() -> None:
    merge = _merge()
    first, second = _updates(2)
    merge.closed("default", 2)
    merge.opened("default", 2)  # back, the youngest: it missed ``first``
    assert merge.received(2, second, 0.0) == []  # held: the senior has not brought it yet
    assert merge.received(0, first, 0.01) == [first]
    assert merge.received(0, second, 0.02) == [second]
    assert merge.received(1, first, 0.03) == [] and merge.received(1, second, 0.03) == []


def test_an_update_the_senior_never_brings_goes_out_when_its_hold_is_over() -> None:
    merge = _merge(hold=0.25)
    update = _updates(1)[0]
    assert merge.received(1, update, 10.0) == []
    assert merge.next_due() == pytest.approx(10.25)
    assert merge.due(10.2) == []
    assert merge.due(10.25) == [update]
    assert merge.received(0, update, 10.3) == []  # the senior's copy, late: a duplicate
    assert merge.next_due() is None


def test_when_the_senior_goes_down_what_waited_for_it_goes_out_in_the_order_first_seen() -> None:
    merge = _merge()
    a, b = _updates(2)
    assert merge.received(1, a, 0.0) == [] and merge.received(2, b, 0.0) == []
    assert merge.closed("default", 1) == []  # not the senior
    assert merge.closed("default", 0) == [a, b]
    assert merge.received(2, a, 0.0) == []  # socket 2 is the senior now; a went out already


def test_accounts_are_merged_apart() -> None:
    merge = _merge()
    merge.opened("b", 3)
    data = order()
    ours, theirs = prepare("default", data), prepare("b", data)
    assert merge.received(0, ours, 0.0) == [ours]
    assert merge.received(3, theirs, 0.0) == [theirs]  # the same figures at another account: its own


def test_the_window_forgets_the_oldest_fingerprints_only() -> None:
    merge = _merge(window=5)
    updates = _updates(6)
    for update in updates:
        assert merge.received(0, update, 0.0) == [update]
    assert merge.received(1, updates[-1], 0.0) == []  # still in the window
    assert merge.received(0, updates[0], 0.0) == [updates[0]]  # forgotten: taken as new


def test_a_message_before_its_socket_was_marked_up_is_taken() -> None:
    merge = OrderMerge()
    update = _updates(1)[0]
    assert merge.received(7, update, 0.0) == [update]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, list[list[int]], list[int]]:
    """n updates; what each of 3 sockets got (the senior, 0, got all; the others miss spans
    while they were down, and are opened again, youngest, after); an interleaving."""
    n = draw(st.integers(1, 30))
    got = [list(range(n))]
    for _ in range(2):
        got.append(sorted(draw(st.sets(st.integers(0, n - 1)))))
    order_of_sockets = [s for s, items in enumerate(got) for _ in items]
    draw(st.randoms()).shuffle(order_of_sockets)
    return n, got, order_of_sockets


@settings(max_examples=300, deadline=None)
@given(deliveries())
def test_whatever_the_others_miss_and_however_they_interleave_kites_order_comes_out(case) -> None:
    n, got, interleaving = case
    updates = _updates(n)
    merge = _merge()
    out: list[Update] = []
    cursor = [0, 0, 0]
    for socket in interleaving:
        update = updates[got[socket][cursor[socket]]]
        cursor[socket] += 1
        out += merge.received(socket, update, 0.0)
    out += merge.due(float("inf"))
    assert out == updates


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 19)), max_size=80), st.integers(0, 5))
def test_with_no_socket_bringing_everything_each_update_still_goes_out_once(arrivals, closes) -> None:
    updates = _updates(20)
    merge = _merge()
    out: list[Update] = []
    for i, (socket, which) in enumerate(arrivals):
        if closes and i % (closes + 3) == 0:  # a socket goes down and comes back, now and then
            out += merge.closed("default", socket)
            merge.opened("default", socket)
        out += merge.received(socket, updates[which], float(i))
    out += merge.due(float("inf"))
    assert len(out) == len(set(out)) == len({which for _, which in arrivals})


def test_every_lets_one_a_second_through_and_counts_the_rest() -> None:
    every = Every(1.0)
    assert every.allow(100.0) == 0
    assert every.allow(100.5) is None and every.allow(100.9) is None
    assert every.allow(101.0) == 2
    assert every.allow(101.1) is None
