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


def test_a_claim_again_whose_first_ticks_were_lost_is_told_by_time_not_dropped() -> None:
    """Ticks 1 and 2 of the new claim never came (Redis away): tick 3 is newer than the
    last one seen, so it is delivered and the two count as missed, not taken for repeats."""
    sub = TickSubscriber("redis://127.0.0.1:1/0")
    assert all(sub._accept(_tick(s, s)) for s in range(1, 51))
    assert sub._accept(_tick(3, 100)) and sub.missed == 2 and sub.gaps == {7: 2}
    assert sub._accept(_tick(4, 101)) and sub.missed == 2
    assert not sub._accept(_tick(3, 100))  # republished: the same tick again
