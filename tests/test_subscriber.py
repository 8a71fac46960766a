"""The subscriber's gap and duplicate rules, without Redis."""

from __future__ import annotations

from consumers.subscriber import TickSubscriber


def _tick(seq: int, at: int, epoch: int = 5) -> dict:
    return {"instrument_token": 7, "seq": seq, "epoch": epoch, "received_at_ns": at}


def test_seq_starting_again_after_a_release_is_neither_a_gap_nor_a_duplicate() -> None:
    sub = TickSubscriber("redis://127.0.0.1:1/0")
    assert [sub._accept(_tick(s, s)) for s in (1, 2, 3)] == [True] * 3
    assert not sub._accept(_tick(3, 3))  # the same tick again (the snapshot)
    assert sub._accept(_tick(1, 10))  # released, claimed again: seq starts at 1
    assert not sub._accept(_tick(1, 10))  # and its snapshot twin is a duplicate
    assert sub._accept(_tick(2, 11)) and sub.missed == 0 and not sub.gaps
    assert not sub._accept(_tick(1, 9))  # an older seq 1 is no restart
    assert sub._accept(_tick(4, 12)) and sub.gaps == {7: 1}  # a real gap still counts
