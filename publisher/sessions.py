"""Which session clients have gone silent; pure logic, no I/O.

A session client's library writes ``{ns}:client_heartbeat`` (client -> epoch seconds)
every third of its timeout. It is silent when both hold:

- its stored heartbeat is older than its timeout, by the wall clock (the time Redis keeps,
  so a restarted publisher or a standby that takes over goes on counting from it), and
- this publisher has not seen the stored value change for a whole timeout, counted from
  when it began to watch (it led, or Redis came back). So a takeover, a Redis outage or a
  client whose clock runs behind never expires a live client, whose value keeps changing;
  a dead one is expired one timeout after that at the latest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Silent:
    """A session client whose claims are to be released."""

    client: str
    timeout: float
    age: float | None  # seconds since its stored heartbeat; None when it has none

    @property
    def reason(self) -> str:
        if self.age is None:
            return f"no heartbeat for {self.timeout:g}s (client timeout {self.timeout:g}s)"
        return f"heartbeat silent for {self.age:.1f}s (client timeout {self.timeout:g}s)"


class HeartbeatWatch:
    """Tells silent session clients from live ones by their stored heartbeats."""

    def __init__(self, now: float) -> None:
        """``now``: monotonic seconds when watching begins."""
        self._since = now
        self._seen: dict[str, tuple[float | None, float]] = {}  # client -> (value, monotonic when it changed)

    def restart(self, now: float) -> None:
        """Count every client's silence from ``now`` again (Redis was away: no client could
        write its heartbeat, and this publisher could not read them)."""
        self._since = now

    def seen(self, client: str, now: float) -> None:
        """The client showed itself otherwise (a request of its own was applied)."""
        value = self._seen.get(client, (None, now))[0]
        self._seen[client] = (value, now)

    def silent(
        self, sessions: Mapping[str, float], beats: Mapping[str, float], wall: float, now: float
    ) -> list[Silent]:
        """The session clients (client -> timeout) silent at ``wall`` (epoch seconds) and
        ``now`` (monotonic seconds), given the stored heartbeats."""
        out = []
        for client in [c for c in self._seen if c not in sessions]:
            del self._seen[client]
        for client, timeout in sessions.items():
            value = beats.get(client)
            last, changed = self._seen.get(client, (None, now))
            if client not in self._seen or value != last:
                changed = now
                self._seen[client] = (value, changed)
            quiet = now - max(changed, self._since)
            age = None if value is None else wall - value
            if quiet > timeout and (age is None or age > timeout):
                out.append(Silent(client, timeout, age))
        return out

    def forget(self, client: str) -> None:
        self._seen.pop(client, None)
