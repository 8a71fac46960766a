"""Desired subscription state and placement over connections; pure logic, no I/O.

A token is subscribed at Kite while at least one client claims it; its mode in force is
the richest any holder asked for. A new token goes to the least-loaded connection with
room. A placed token moves only in a rebalance, make-before-break: while it moves it is
held (and counted) on both connections, so no connection ever passes its limit. Every
change comes back as a plan of per-connection operations for the connections to execute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kitewire.codec import MODE_RANK
from publisher.requests import RELEASES, Request


@dataclass
class ConnectionChange:
    """What one connection must tell Kite: new tokens, dropped tokens, mode changes."""

    subscribe: dict[int, str] = field(default_factory=dict)
    unsubscribe: set[int] = field(default_factory=set)
    modes: dict[int, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe or self.modes)


Plan = dict[int, ConnectionChange]


@dataclass(frozen=True)
class Outcome:
    """The result of applying one request."""

    applied: tuple[int, ...]
    rejected: tuple[int, ...]
    error: str
    plan: Plan
    released: tuple[int, ...] = ()  # a set: the client's claims it no longer makes

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.error


class RebalanceBusy(Exception):
    """A rebalance was asked for while the previous one is still moving tokens."""


class SubscriptionBook:
    """Per-client claims, the mode in force per token, and which connection holds it."""

    def __init__(self, connections: int, per_connection: int) -> None:
        if connections < 1 or per_connection < 1:
            raise ValueError("need at least one connection with room for one token")
        self.connections = connections
        self.per_connection = per_connection
        self.claims: dict[str, dict[int, str]] = {}  # client -> token -> mode asked
        self._holders: dict[int, dict[str, str]] = {}  # token -> client -> mode asked
        self.placement: dict[int, int] = {}  # token -> connection index
        self.in_force: dict[int, str] = {}  # token -> richest mode asked
        self.deadlines: dict[str, dict[int, float]] = {}  # client -> token -> when its claim lapses
        # Session clients (their claims live while they heartbeat) -> timeout in seconds. A
        # client is one from its first request that says so until it holds no claim.
        self.sessions: dict[str, float] = {}
        self.moving: dict[int, int] = {}  # token -> the connection it is moving away from
        self.loads = [0] * connections  # tokens held per connection, a moving one on both

    @property
    def capacity(self) -> int:
        return self.connections * self.per_connection

    def connection_modes(self, index: int) -> dict[int, str]:
        """Every token held on connection ``index`` (a moving one on both) with its mode in force."""
        held = {t for t, i in self.placement.items() if i == index}
        held.update(t for t, src in self.moving.items() if src == index)
        return {t: self.in_force[t] for t in held}

    def serving(self, token: int) -> int:
        """The connection whose ticks of ``token`` are published: the old one while it moves."""
        return self.moving.get(token, self.placement[token])

    # --- rebalancing ---------------------------------------------------------------------

    def rebalance(self) -> tuple[dict[int, tuple[int, int]], Plan]:
        """Even out the connections: token -> (from, to) for each token to move, and the plan
        that subscribes them on their new connections (the make half). Each stays held on
        its old connection until ``finish_move``. Raises ``RebalanceBusy`` while moving."""
        if self.moving:
            raise RebalanceBusy(f"a rebalance is still moving {len(self.moving)} token(s)")
        base, extra = divmod(sum(self.loads), self.connections)
        by_load = sorted(range(self.connections), key=lambda i: (-self.loads[i], i))
        target = {index: base + (rank < extra) for rank, index in enumerate(by_load)}
        surplus = {i: sorted(self.connection_modes(i))[: max(0, self.loads[i] - target[i])] for i in by_load}
        moves: dict[int, tuple[int, int]] = {}
        plan: Plan = {}
        for dst in by_load[::-1]:
            for _ in range(target[dst] - self.loads[dst]):
                src = next(i for i in by_load if surplus[i])
                token = surplus[src].pop()
                moves[token] = (src, dst)
                self.moving[token] = src
                self.placement[token] = dst
                self.loads[dst] += 1
                _change(plan, dst).subscribe[token] = self.in_force[token]
        return moves, plan

    def finish_move(self, token: int, src: int) -> ConnectionChange | None:
        """The break half of one move: drop ``token`` from ``src``. None if the move ended
        otherwise (the token was released, or moved again) in the meantime."""
        if self.moving.get(token) != src:
            return None
        del self.moving[token]
        self.loads[src] -= 1
        return ConnectionChange(unsubscribe={token})

    def apply(self, request: Request, now: float = 0.0) -> Outcome:
        """Apply a request; ``now`` (epoch seconds) dates the deadlines of ``ttl`` claims."""
        # A client holding standing claims stays standing: a session request under its id
        # (the library's default client id, a script's cleanup of ctl claims) must not make
        # claims that were to stay until released die with that script.
        standing = request.client in self.claims and request.client not in self.sessions
        outcome = self._apply(request)
        if request.op not in RELEASES:
            for token in outcome.applied:
                self._set_deadline(request, token, now)
        if request.session is not None and request.client in self.claims and not standing:
            self.sessions[request.client] = request.session
        return outcome

    def _set_deadline(self, request: Request, token: int, now: float) -> None:
        """A ttl gives the claim a deadline; a subscribe or set without one makes it lasting;
        a mode change without one leaves it as it was."""
        deadlines = self.deadlines.setdefault(request.client, {})
        if request.ttl is not None:
            deadlines[token] = now + request.ttl
        elif request.op != "mode":
            deadlines.pop(token, None)
        if not deadlines:
            del self.deadlines[request.client]

    def due(self, now: float) -> dict[str, tuple[int, ...]]:
        """Per client, the claims whose deadline has passed."""
        lapsed = {
            client: tuple(sorted(t for t, deadline in deadlines.items() if deadline <= now))
            for client, deadlines in self.deadlines.items()
        }
        return {client: tokens for client, tokens in lapsed.items() if tokens}

    def _apply(self, request: Request) -> Outcome:
        plan: Plan = {}
        applied: list[int] = []
        rejected: list[int] = []
        if request.op == "unsubscribe":
            for token in request.tokens:
                self._release(request.client, token, plan)
                applied.append(token)
            error = ""
        elif request.op == "subscribe":
            assert request.mode is not None
            for token in request.tokens:
                (applied if self._hold(request.client, token, request.mode, plan) else rejected).append(token)
            used = sum(self.loads)
            error = f"{len(rejected)} token(s) rejected: capacity full ({used} of {self.capacity} in use)"
        elif request.op == "set":
            return self._set(request)
        elif request.op == "release":  # every claim of the client (one that vanished)
            applied.extend(self.claims.get(request.client, ()))
            for token in applied:
                self._release(request.client, token, plan)
            error = ""
        else:
            assert request.mode is not None
            held = self.claims.get(request.client, {})
            for token in request.tokens:
                if token in held:
                    self._hold(request.client, token, request.mode, plan)
                    applied.append(token)
                else:
                    rejected.append(token)
            error = f"{len(rejected)} token(s) not subscribed by client '{request.client}'"
        return Outcome(tuple(applied), tuple(rejected), error if rejected else "", _nonempty(plan))

    def _set(self, request: Request) -> Outcome:
        """Make the client's claims exactly these tokens in this mode, all or nothing.
        Tokens it keeps are never released in between (no gap); the ones it drops go first,
        so that their room serves the new ones."""
        assert request.mode is not None
        wanted = set(request.tokens)
        held = self.claims.get(request.client, {})
        dropped = [t for t in held if t not in wanted]
        frees = sum(1 for t in dropped if set(self._holders[t]) == {request.client})
        new = sum(1 for t in wanted if t not in self.placement)
        free = self.capacity - sum(self.loads)
        if new > free + frees:
            error = f"set needs room for {new} new token(s), {free + frees} free: nothing changed"
            return Outcome((), request.tokens, error, {})
        plan: Plan = {}
        for token in dropped:
            self._release(request.client, token, plan)
        for token in request.tokens:
            placed = self._hold(request.client, token, request.mode, plan)
            assert placed, "room was checked above"
        return Outcome(request.tokens, (), "", _nonempty(plan), tuple(dropped))

    def restore(
        self,
        claims: Mapping[str, Mapping[int, str]],
        deadlines: Mapping[str, Mapping[int, float]] | None = None,
        sessions: Mapping[str, float] | None = None,
    ) -> tuple[Plan, dict[str, list[int]]]:
        """Load persisted claims, their deadlines and which clients are session clients (at
        start, before any request). Returns the plan and, per client, the tokens that no
        longer fit (dropped from the claims)."""
        plan: Plan = {}
        dropped: dict[str, list[int]] = {}
        for client in sorted(claims):
            for token, mode in claims[client].items():
                if mode not in MODE_RANK or not self._hold(client, token, mode, plan):
                    dropped.setdefault(client, []).append(token)
                elif deadlines and token in deadlines.get(client, {}):
                    self.deadlines.setdefault(client, {})[token] = deadlines[client][token]
        self.sessions.update({c: timeout for c, timeout in (sessions or {}).items() if c in self.claims})
        return _nonempty(plan), dropped

    # --- the two state changes ----------------------------------------------------------

    def _hold(self, client: str, token: int, mode: str, plan: Plan) -> bool:
        index = self.placement.get(token)
        if index is None:
            index = self._room()
            if index is None:
                return False
            self.placement[token] = index
            self.loads[index] += 1
            self._holders[token] = {client: mode}
            self.claims.setdefault(client, {})[token] = mode
            self.in_force[token] = mode
            _change(plan, index).subscribe[token] = mode
            return True
        self._holders[token][client] = mode
        self.claims.setdefault(client, {})[token] = mode
        self._refresh_mode(token, index, plan)
        return True

    def _release(self, client: str, token: int, plan: Plan) -> None:
        held = self.claims.get(client)
        if held is None or token not in held:
            return
        del held[token]
        if not held:
            del self.claims[client]
            self.sessions.pop(client, None)
        deadlines = self.deadlines.get(client)
        if deadlines is not None and deadlines.pop(token, None) is not None and not deadlines:
            del self.deadlines[client]
        holders = self._holders[token]
        del holders[client]
        index = self.placement[token]
        if holders:
            self._refresh_mode(token, index, plan)
            return
        del self._holders[token], self.placement[token], self.in_force[token]
        held_on = [index]
        src = self.moving.pop(token, None)
        if src is not None:  # released in the middle of a move: it goes from both
            held_on.append(src)
        for index in held_on:
            self.loads[index] -= 1
            change = _change(plan, index)
            if change.subscribe.pop(token, None) is None:
                change.unsubscribe.add(token)
            change.modes.pop(token, None)

    def _refresh_mode(self, token: int, index: int, plan: Plan) -> None:
        richest = max(self._holders[token].values(), key=MODE_RANK.__getitem__)
        if richest == self.in_force[token]:
            return
        self.in_force[token] = richest
        held_on = (index,) if token not in self.moving else (index, self.moving[token])
        for index in held_on:
            change = _change(plan, index)
            if token in change.subscribe:
                change.subscribe[token] = richest
            else:
                change.modes[token] = richest

    def _room(self) -> int | None:
        best = min(range(self.connections), key=self.loads.__getitem__)
        return best if self.loads[best] < self.per_connection else None


def _change(plan: Plan, index: int) -> ConnectionChange:
    change = plan.get(index)
    if change is None:
        change = plan[index] = ConnectionChange()
    return change


def _nonempty(plan: Plan) -> Plan:
    return {index: change for index, change in plan.items() if change}
