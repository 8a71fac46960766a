"""publisher/inflight.py: replies matched to what was sent, lane by lane, without sockets."""

from __future__ import annotations

from kitewire import codec
from publisher.inflight import Batch, InFlight, Released

A, B, C = 408065, 884737, 2953217


def _batch(lane0: tuple[int, ...], lane1: tuple[int, ...], released: tuple[int, ...] = ()) -> Batch:
    """Ticks of ``lane0`` and ``lane1`` (a republish each), and an HDEL on lane 1."""
    commands = [[(len(lane0), lane0)] if lane0 else [], [(len(lane1), lane1)] if lane1 else []]
    if released:
        commands[1].append((1, Released(released)))
    replies = [sum(n for n, _ in c) for c in commands]
    return Batch(100, replies, [len(lane0), len(lane1)], commands)


def _ok(n: int) -> bytes:
    return b":1\r\n" * n


def test_a_batch_is_done_once_every_lane_answered_its_part() -> None:
    flight = InFlight(2)
    flight.add(_batch((A, B), (C,)), [b"x", b"y"])
    assert flight.read(0, _ok(2), careful=True).done == 0 and flight.ticks == 3
    answers = flight.read(1, _ok(1), careful=True)
    assert answers.done == 3 and flight.ticks == 0 and flight.bytes == 0 and not flight.batches


def test_batches_are_done_with_in_the_order_they_were_sent() -> None:
    flight = InFlight(2)
    flight.add(_batch((A,), (B,)), [b"x", b"y"])
    flight.add(_batch((C,), ()), [b"x", b""])
    assert flight.read(0, _ok(2), careful=False).done == 0  # the second is answered, the first is not
    assert flight.read(1, _ok(1), careful=False).done == 3


def test_after_an_error_exactly_the_ticks_that_failed_are_known() -> None:
    flight = InFlight(1)
    flight.add(_batch((A, B, C), ()), [b"x"])
    answers = flight.read(0, b":1\r\n-MOVED 1234 127.0.0.1:7001\r\n:1\r\n", careful=True)
    assert (answers.failed, answers.done, answers.lost, answers.redirected) == (1, 2, {B}, True)
    assert answers.errors == 1 and "MOVED" in answers.last_error


def test_replies_split_mid_line_are_matched_all_the_same() -> None:
    flight = InFlight(1)
    flight.add(_batch((A, B, C), ()), [b"x"])
    first = flight.read(0, b":1\r\n:", careful=True)  # counted: the first reply; the second under way
    second = flight.read(0, b"1\r\n-TRYAGAIN x\r", careful=True)  # errors start reply by reply reading
    third = flight.read(0, b"\n", careful=True)
    assert (first.done, second.failed, third.failed, third.lost, third.done) == (0, 0, 1, {C}, 2)


def test_a_newer_tick_that_went_out_is_not_sent_again() -> None:
    flight = InFlight(1)
    flight.add(_batch((A,), ()), [b"x"])
    flight.add(_batch((A,), ()), [b"x"])
    answers = flight.read(0, b"-CLUSTERDOWN down\r\n:1\r\n", careful=True)
    assert answers.failed == 1 and answers.lost == set() and answers.done == 1


def test_a_failed_hdel_goes_again() -> None:
    flight = InFlight(2)
    flight.add(_batch((), (A,), released=(B, C)), [b"", b"y"])
    answers = flight.read(1, b":1\r\n-ASK 5 127.0.0.1:7002\r\n", careful=True)
    assert answers.released == {B, C} and answers.failed == 0 and answers.done == 1


def test_a_failed_lane_loses_its_share_only() -> None:
    flight = InFlight(2)
    flight.add(_batch((A,), (B,), released=(C,)), [b"x", b"y"])
    lost = flight.fail_lane(1)
    assert (lost.failed, lost.lost, lost.released, lost.done) == (1, {B}, {C}, 0)
    assert flight.read(0, _ok(1), careful=True).done == 1  # lane 0's tick went out


def test_everything_in_flight_is_lost_when_every_socket_fails() -> None:
    flight = InFlight(1)
    frame = codec.encode_frame([codec.encode_packet({"instrument_token": t, "mode": "ltp", "last_price": 1.0})
                                for t in (A, B)])  # fmt: skip
    flight.add(Batch(10, [2], [2], [[(2, frame)]]), [b"x"])
    lost = flight.fail_all()
    assert (lost.failed, lost.lost, flight.ticks, flight.bytes) == (2, {A, B}, 0, 0)


def test_on_one_server_errors_are_counted_and_the_ticks_still_done_with() -> None:
    flight = InFlight(1)
    flight.add(_batch((A, B), ()), [b"x"])
    answers = flight.read(0, b":1\r\n-OOM no\r\n", careful=False)
    assert (answers.errors, answers.done, answers.failed) == (1, 2, 0)
