"""The heartbeat judge: when a session client counts as gone, and when never."""

from __future__ import annotations

from publisher.sessions import HeartbeatWatch

WALL = 1_764_330_000.0  # epoch seconds at monotonic 0


def _silent(watch: HeartbeatWatch, sessions, beats, now: float, skew: float = 0.0) -> dict[str, float | None]:
    return {s.client: s.age for s in watch.silent(sessions, beats, WALL + now + skew, now)}


def test_a_client_whose_heartbeat_stopped_is_silent_after_its_timeout() -> None:
    watch = HeartbeatWatch(now=0)
    for now in range(0, 30, 5):  # beating every 5 s (a third of 15): never silent
        assert _silent(watch, {"a": 15.0}, {"a": WALL + now}, now) == {}
    last = WALL + 25
    assert _silent(watch, {"a": 15.0}, {"a": last}, 40) == {}  # 15 s: not more than the timeout
    assert _silent(watch, {"a": 15.0}, {"a": last}, 41) == {"a": 16.0}


def test_after_a_takeover_every_client_gets_a_whole_timeout_to_show_itself() -> None:
    watch = HeartbeatWatch(now=100)  # a new leader; the heartbeat it finds is 50 s old
    assert _silent(watch, {"dead": 15.0}, {"dead": WALL + 50}, 100) == {}
    assert _silent(watch, {"dead": 15.0}, {"dead": WALL + 50}, 115) == {}
    assert _silent(watch, {"dead": 15.0}, {"dead": WALL + 50}, 116) == {"dead": 66.0}  # still expired


def test_a_redis_outage_restarts_the_count() -> None:
    watch = HeartbeatWatch(now=0)
    assert _silent(watch, {"a": 10.0}, {"a": WALL}, 0) == {}
    watch.restart(now=30)  # Redis was away from 5 to 30: nobody could beat
    assert _silent(watch, {"a": 10.0}, {"a": WALL}, 30) == {}
    assert _silent(watch, {"a": 10.0}, {"a": WALL + 33}, 33) == {}  # its first beat since


def test_a_client_clock_behind_never_expires_it_while_its_heartbeat_changes() -> None:
    watch = HeartbeatWatch(now=0)
    for now in range(0, 60, 3):  # its clock is 120 s behind: every stored beat looks old
        assert _silent(watch, {"a": 10.0}, {"a": WALL + now - 120}, now) == {}
    assert _silent(watch, {"a": 10.0}, {"a": WALL + 57 - 120}, 68) == {"a": 131.0}  # once it stops


def test_a_stored_heartbeat_younger_than_the_timeout_is_never_silent() -> None:
    watch = HeartbeatWatch(now=0)
    # the value did not change for 20 s here, but it says 5 s ago (a clock ahead, or a beat
    # written just before this publisher began watching): what `kitebus ctl clients` shows wins
    assert _silent(watch, {"a": 10.0}, {"a": WALL + 15}, 20) == {}


def test_a_missing_heartbeat_counts_once_unchanged_for_a_timeout() -> None:
    watch = HeartbeatWatch(now=0)
    assert _silent(watch, {"a": 5.0}, {}, 1) == {}
    assert _silent(watch, {"a": 5.0}, {}, 7) == {"a": None}
    assert [s.reason for s in watch.silent({"a": 5.0}, {}, WALL + 7, 7)] == [
        "no heartbeat for 5s (client timeout 5s)"
    ]


def test_a_request_counts_as_a_sign_of_life() -> None:
    watch = HeartbeatWatch(now=0)
    assert _silent(watch, {"a": 5.0}, {"a": WALL}, 1) == {}
    watch.seen("a", now=5)
    assert _silent(watch, {"a": 5.0}, {"a": WALL}, 9) == {}
    assert _silent(watch, {"a": 5.0}, {"a": WALL}, 11) == {"a": 11.0}


def test_clients_no_longer_in_session_are_forgotten() -> None:
    watch = HeartbeatWatch(now=0)
    _silent(watch, {"a": 5.0}, {"a": WALL}, 0)
    assert _silent(watch, {}, {"a": WALL}, 100) == {}
    assert _silent(watch, {"a": 5.0}, {"a": WALL}, 101) == {}  # seen anew: a whole timeout again
