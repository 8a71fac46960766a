"""The subscription book: ref counts, richest mode, placement, capacity, plans."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kitewire.codec import MODE_RANK, MODES
from publisher.requests import Request
from publisher.subscriptions import ConnectionChange, RebalanceBusy, SubscriptionBook


def sub(tokens, mode="quote", client="a") -> Request:
    return Request("subscribe", tuple(tokens), client, mode)


def unsub(tokens, client="a") -> Request:
    return Request("unsubscribe", tuple(tokens), client)


def test_new_tokens_spread_to_the_least_loaded_connection() -> None:
    book = SubscriptionBook(3, 10)
    outcome = book.apply(sub(range(1, 7)))
    assert outcome.ok and outcome.applied == tuple(range(1, 7))
    assert book.loads == [2, 2, 2]
    assert {i: set(c.subscribe) for i, c in outcome.plan.items()} == {0: {1, 4}, 1: {2, 5}, 2: {3, 6}}


def test_capacity_rejects_by_name_and_applies_the_rest() -> None:
    book = SubscriptionBook(3, 3000)
    assert book.apply(sub(range(1, 9001))).ok
    assert book.loads == [3000, 3000, 3000]
    outcome = book.apply(sub([9001, 5]))
    assert outcome.rejected == (9001,) and outcome.applied == (5,)
    assert not outcome.ok and "capacity full (9000 of 9000 in use)" in outcome.error
    assert 9001 not in book.placement and max(book.loads) == 3000


def test_shared_token_ref_count_and_richest_mode() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(sub([7], "ltp", "a"))
    outcome = book.apply(sub([7], "full", "b"))
    assert outcome.plan == {0: ConnectionChange(modes={7: "full"})}
    assert book.in_force[7] == "full"
    outcome = book.apply(unsub([7], "b"))
    assert outcome.plan == {0: ConnectionChange(modes={7: "ltp"})}
    outcome = book.apply(unsub([7], "a"))
    assert outcome.plan == {0: ConnectionChange(unsubscribe={7})}
    assert book.placement == {} and book.claims == {} and book.loads == [0, 0, 0]


def test_reapplying_a_request_changes_nothing() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(sub([1, 2], "full"))
    again = book.apply(sub([1, 2], "full"))
    assert again.ok and again.plan == {}
    book.apply(unsub([1]))
    assert book.apply(unsub([1])).plan == {}


def test_mode_needs_the_client_to_hold_the_token() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(sub([1], client="a"))
    outcome = book.apply(Request("mode", (1, 2), "a", "full"))
    assert outcome.applied == (1,) and outcome.rejected == (2,)
    assert "not subscribed by client 'a'" in outcome.error
    assert book.in_force == {1: "full"}


def test_restore_places_claims_and_drops_what_no_longer_fits() -> None:
    book = SubscriptionBook(1, 2)
    plan, dropped = book.restore({"a": {1: "full", 2: "ltp"}, "b": {2: "quote", 3: "ltp"}})
    assert plan == {0: ConnectionChange(subscribe={1: "full", 2: "quote"})}
    assert dropped == {"b": [3]}
    assert book.claims == {"a": {1: "full", 2: "ltp"}, "b": {2: "quote"}}


requests = st.builds(
    Request,
    op=st.sampled_from(["subscribe", "unsubscribe", "mode", "release", "rebalance", "finish"]),
    tokens=st.lists(st.integers(1, 16), min_size=1, max_size=8, unique=True).map(tuple),
    client=st.sampled_from(["a", "b", "c"]),
    mode=st.sampled_from(MODES),
)


@settings(max_examples=600)
@given(st.integers(1, 3), st.integers(1, 12), st.lists(requests, max_size=40))
def test_invariants_hold_for_any_request_sequence(connections, per_connection, sequence) -> None:
    """Requests, rebalances and the moves' ends in any order: what Kite was told always
    matches the book, no connection passes its limit, every held token is held somewhere."""
    book = SubscriptionBook(connections, per_connection)
    kite: dict[int, dict[int, str]] = {i: {} for i in range(connections)}  # what plans told Kite
    moves: dict[int, tuple[int, int]] = {}
    for request in sequence:
        if request.op == "rebalance":
            try:
                new_moves, plan = book.rebalance()
            except RebalanceBusy:
                assert book.moving
                continue
            moves.update(new_moves)
        elif request.op == "finish":  # the break half of some of the moves, possibly stale
            plan = {}
            for token in request.tokens:
                if token in moves:
                    src, _ = moves.pop(token)
                    change = book.finish_move(token, src)
                    if change is not None:
                        plan[src] = change
        else:
            if request.op in ("unsubscribe", "release"):
                tokens = request.tokens if request.op == "unsubscribe" else ()
                request = Request(request.op, tokens, request.client)
            held = set(book.claims.get(request.client, ()))
            outcome = book.apply(request)
            if request.op == "release":
                assert set(outcome.applied) == held and request.client not in book.claims
                request = Request("release", outcome.applied, request.client)
            assert set(outcome.applied) | set(outcome.rejected) == set(request.tokens)
            plan = outcome.plan
        for index, change in plan.items():
            for token in change.unsubscribe:
                del kite[index][token]
            for token, mode in change.subscribe.items():
                assert token not in kite[index]
                kite[index][token] = mode
            for token, mode in change.modes.items():
                kite[index][token] = mode
        for index in range(connections):
            assert kite[index] == book.connection_modes(index)
            assert len(kite[index]) == book.loads[index] <= per_connection
        held = {t for claims in book.claims.values() for t in claims}
        assert held == set(book.placement) == set(book.in_force)
        assert held == {t for index in kite.values() for t in index}
        for token, src in book.moving.items():
            assert token in kite[src] and token in kite[book.placement[token]]
        for token, mode in book.in_force.items():
            asked = [claims[token] for claims in book.claims.values() if token in claims]
            assert mode == max(asked, key=MODE_RANK.__getitem__)


def set_(tokens, mode="quote", client="a") -> Request:
    return Request("set", tuple(tokens), client, mode)


def test_set_replaces_a_watchlist_without_releasing_what_stays() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(sub([1, 2, 3], mode="quote"))
    book.apply(sub([3], mode="ltp", client="b"))
    outcome = book.apply(set_([2, 3, 4], mode="full"))
    assert outcome.ok and outcome.applied == (2, 3, 4) and outcome.released == (1,)
    assert book.claims["a"] == {2: "full", 3: "full", 4: "full"}
    unsubscribed = {t for change in outcome.plan.values() for t in change.unsubscribe}
    assert unsubscribed == {1}  # 2 and 3 stay subscribed at Kite the whole time
    modes = {t: m for change in outcome.plan.values() for t, m in change.modes.items()}
    assert modes == {2: "full", 3: "full"}
    assert book.in_force == {2: "full", 3: "full", 4: "full"}


def test_set_is_all_or_nothing_and_counts_the_room_its_releases_free() -> None:
    book = SubscriptionBook(1, 3)
    book.apply(sub([1, 2, 3]))
    assert book.apply(set_([4, 5, 6])).ok  # 1, 2, 3 make room for 4, 5, 6
    assert book.placement == {4: 0, 5: 0, 6: 0}
    book.apply(sub([4], client="b"))  # b shares 4: releasing it frees nothing
    before = (dict(book.placement), {c: dict(h) for c, h in book.claims.items()})
    outcome = book.apply(set_([7, 8, 9]))
    assert not outcome.ok and outcome.rejected == (7, 8, 9) and "nothing changed" in outcome.error
    assert (book.placement, book.claims) == before and outcome.plan == {}


def test_set_to_nothing_is_not_a_request_but_set_of_the_same_is_a_no_op() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(sub([1, 2]))
    outcome = book.apply(set_([1, 2]))
    assert outcome.ok and outcome.plan == {} and outcome.released == ()


def test_ttl_claims_come_due_and_a_lasting_subscribe_clears_the_deadline() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(Request("subscribe", (1, 2), "a", "quote", ttl=60), now=1000)
    book.apply(Request("mode", (2,), "a", "full"), now=1010)  # a mode change keeps the deadline
    assert book.deadlines == {"a": {1: 1060, 2: 1060}}
    assert book.due(1059) == {} and book.due(1060) == {"a": (1, 2)}
    book.apply(sub([1]), now=1020)  # subscribed again without ttl: lasting
    assert book.deadlines == {"a": {2: 1060}}
    book.apply(unsub([2]))
    assert book.deadlines == {} and book.due(10**9) == {}


def test_deadlines_survive_a_restore() -> None:
    book = SubscriptionBook(3, 10)
    book.restore({"a": {1: "quote", 2: "full"}}, {"a": {2: 99.0}})
    assert book.deadlines == {"a": {2: 99.0}} and book.due(100) == {"a": (2,)}


def test_a_session_client_is_one_from_its_first_session_request_until_it_holds_no_claim() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(Request("subscribe", (1,), "ops", "quote"))  # straight to the stream: standing
    book.apply(Request("subscribe", (1, 2), "lib", "quote", session=60.0))
    book.apply(Request("subscribe", (9,), "lib", "full"))  # a request without it changes no kind
    assert book.sessions == {"lib": 60.0}
    book.apply(Request("unsubscribe", (1, 2), "lib", session=30.0))
    assert book.sessions == {"lib": 30.0}  # it still holds 9; its latest timeout counts
    book.apply(Request("release", (), "lib"))
    assert book.sessions == {} and book.claims == {"ops": {1: "quote"}}
    rejected = SubscriptionBook(1, 1)
    rejected.apply(sub([1], client="other"))
    rejected.apply(Request("subscribe", (2,), "lib", "quote", session=60.0))  # no room: no claim, no kind
    assert rejected.sessions == {}


def test_sessions_survive_a_restore_for_clients_that_still_hold_claims() -> None:
    book = SubscriptionBook(1, 1)
    _, dropped = book.restore({"a": {1: "quote"}, "b": {2: "quote"}}, {}, {"a": 5.0, "b": 7.0, "c": 9.0})
    assert dropped == {"b": [2]} and book.sessions == {"a": 5.0}


def test_rebalance_evens_out_make_before_break() -> None:
    book = SubscriptionBook(3, 4)
    book.apply(sub(range(1, 13)))
    book.apply(unsub([2, 5, 8, 11, 3, 6, 9]))  # connection 0 keeps 1, 4, 7, 10
    assert book.loads == [4, 0, 1]
    moves, plan = book.rebalance()
    assert len(moves) == 2 and all(src == 0 for src, _ in moves.values())
    assert sorted(dst for _, dst in moves.values()) == [1, 2]
    assert plan == {dst: ConnectionChange(subscribe={t: "quote"}) for t, (_, dst) in moves.items()}
    assert book.loads == [4, 1, 2]  # the moving tokens count on both connections
    assert all(book.serving(t) == 0 for t in moves)  # still published from the old one
    for token, (src, dst) in moves.items():
        assert book.finish_move(token, src) == ConnectionChange(unsubscribe={token})
        assert book.serving(token) == dst
    assert book.loads == [2, 1, 2] and book.moving == {}


def test_a_second_rebalance_is_refused_while_tokens_move() -> None:
    book = SubscriptionBook(2, 10)
    book.apply(sub(range(1, 7)))
    book.apply(unsub([2, 4, 6]))
    book.rebalance()
    before = (dict(book.placement), list(book.loads))
    try:
        book.rebalance()
    except RebalanceBusy as exc:
        assert "still moving 1 token(s)" in str(exc)
    else:
        raise AssertionError("a second rebalance was accepted")
    assert (book.placement, book.loads) == before


def test_a_token_released_while_it_moves_goes_from_both_connections() -> None:
    book = SubscriptionBook(2, 10)
    book.apply(sub([1, 2, 3, 4]))
    book.apply(unsub([2, 4]))
    (token, (src, dst)), = book.rebalance()[0].items()
    outcome = book.apply(Request("mode", (token,), "a", "full"))
    assert outcome.plan == {i: ConnectionChange(modes={token: "full"}) for i in (src, dst)}
    outcome = book.apply(unsub([token]))
    assert outcome.plan == {i: ConnectionChange(unsubscribe={token}) for i in (src, dst)}
    assert book.finish_move(token, src) is None and book.loads == [1, 0]


def test_release_drops_every_claim_of_one_client_only() -> None:
    book = SubscriptionBook(3, 10)
    book.apply(Request("subscribe", (1, 2), "gone", "full", ttl=60), now=0)
    book.apply(sub([2, 3], "ltp", "alive"))
    outcome = book.apply(Request("release", (), "gone"))
    assert outcome.ok and set(outcome.applied) == {1, 2}
    assert book.claims == {"alive": {2: "ltp", 3: "ltp"}} and book.deadlines == {}
    assert book.in_force == {2: "ltp", 3: "ltp"}
    assert book.apply(Request("release", (), "gone")).applied == ()


def test_a_standing_client_stays_standing_whatever_session_requests_come_under_its_id() -> None:
    """Found by review: ops' claims under "default" (a raw XADD), then a library client with
    the default id, or a script tidying up ctl claims: the standing claims must not expire."""
    book = SubscriptionBook(3, 10)
    book.apply(Request("subscribe", (1,), "default", "quote"))  # redis-cli XADD without a client
    book.apply(Request("subscribe", (2,), "default", "quote", session=60.0))  # the library's default id
    book.apply(Request("subscribe", (3, 4), "ops", "quote"))  # kitebus ctl
    book.apply(Request("unsubscribe", (4,), "ops", session=60.0))  # a script's cleanup
    assert book.sessions == {}
    assert book.claims == {"default": {1: "quote", 2: "quote"}, "ops": {3: "quote"}}
