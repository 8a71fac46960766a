"""Every Redis key and channel name of the contract, derived from the namespace."""

from __future__ import annotations

from dataclasses import dataclass

CONTROL_GROUP = "publisher"
RESULTS_MAXLEN = 10_000  # entries kept in {ns}:control:results (trimmed approximately)
ORDERS_MAXLEN = 50_000  # order updates kept in {ns}:orders (trimmed approximately; about 1 KB each)
# ``state`` of {ns}:status while a publisher leads and publishes (degraded: with a fault, see
# ``degraded_reason``)
SERVING = ("running", "degraded")


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace (`{ns}` in the contract)."""

    ns: str = "kite"

    @property
    def control(self) -> str:
        return f"{self.ns}:control"

    @property
    def control_results(self) -> str:
        return f"{self.ns}:control:results"

    @property
    def token_conn(self) -> str:
        return f"{self.ns}:token_conn"

    @property
    def token_mode(self) -> str:
        return f"{self.ns}:token_mode"

    @property
    def status(self) -> str:
        return f"{self.ns}:status"

    @property
    def last(self) -> str:
        return f"{self.ns}:last"

    @property
    def token_status(self) -> str:
        return f"{self.ns}:token_status"

    @property
    def stream_status(self) -> str:
        """Pub/sub channel of stream status changes (``live`` / ``stale``)."""
        return f"{self.ns}:stream_status"

    @property
    def orders(self) -> str:
        """Stream of order updates (fields ``account``, ``order_id``, ``status``, ``data``), and
        the pub/sub channel of the same name (a msgpack map per update)."""
        return f"{self.ns}:orders"

    @property
    def instruments(self) -> str:
        """Hash: ``EXCHANGE:TRADINGSYMBOL`` -> token and token -> symbol, from Kite's dump."""
        return f"{self.ns}:instruments"

    @property
    def leader(self) -> str:
        """String ``<fence>:<host>:<pid>`` of the publisher that leads; expires unless renewed."""
        return f"{self.ns}:leader"

    @property
    def standby(self) -> str:
        """Hash of the publisher standing by: ``pid``, ``host``, ``since``, ``heartbeat_at``, ``refusing``."""
        return f"{self.ns}:standby"

    @property
    def client_activity(self) -> str:
        """Hash: client -> epoch seconds of its last applied request (to find vanished ones)."""
        return f"{self.ns}:client_activity"

    @property
    def clients(self) -> str:
        return f"{self.ns}:clients"

    @property
    def session_clients(self) -> str:
        """Hash: session client -> its timeout in seconds (its claims live while it heartbeats)."""
        return f"{self.ns}:session_clients"

    @property
    def client_heartbeat(self) -> str:
        """Hash: client -> epoch seconds of its last heartbeat (the library's, or a session request's)."""
        return f"{self.ns}:client_heartbeat"

    @property
    def ticks_pattern(self) -> str:
        return f"{self.ns}:ticks:*"

    def ticks(self, token: int) -> str:
        return f"{self.ns}:ticks:{token}"

    def conn(self, index: int) -> str:
        return f"{self.ns}:conn:{index}"

    def claims(self, client: str) -> str:
        return f"{self.ns}:claims:{client}"

    def slot_fence(self, tag: str) -> str:
        """On a cluster: string, the highest lease fence that wrote to the slot of ``tag``
        (a hash tag), so that a deposed leader's writes to that slot are refused."""
        return f"{self.ns}:fence:{{{tag}}}"

    def deadlines(self, client: str) -> str:
        """Hash: token -> epoch seconds when that claim of the client lapses (ttl claims only)."""
        return f"{self.ns}:deadlines:{client}"
