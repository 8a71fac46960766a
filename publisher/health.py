"""What is wrong with the publisher right now, as data for the status and the metrics.

Each component reports its own trouble under its own name (``fault``) and takes it back
when it is over (``clear``); the publisher is ``degraded`` while any is reported. A task
that crashed and was restarted is counted here; one that keeps crashing sets ``fatal``,
and the process exits non-zero with the reason so that compose or systemd restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("kitebus.health")


class Health:
    """Faults by component, task restarts, and the one fatal reason (if any)."""

    def __init__(
        self,
        *,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        settle: float = 5.0,
        restart_backoff: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        """The rest is the policy of ``tasks.supervised``: more than ``max_restarts`` crashes
        of one task in ``restart_window`` seconds is fatal; a restarted task that has run
        ``settle`` seconds counts as recovered; waits before a restart grow over
        ``restart_backoff`` (first, cap)."""
        self._faults: dict[str, tuple[str, float]] = {}  # component -> (reason, since: epoch s)
        self.restarts: dict[str, int] = {}  # task name -> times restarted after a crash
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        self.max_restarts, self.restart_window = max_restarts, restart_window
        self.settle, self.restart_backoff = settle, restart_backoff

    def fault(self, component: str, reason: str) -> None:
        """``component`` is in trouble (Redis away or saying no, ...); logged when it starts."""
        previous = self._faults.get(component)
        if previous is None:
            log.warning("degraded component=%s reason=%s", component, reason)
            self._faults[component] = (reason, time.time())
        elif previous[0] != reason:
            self._faults[component] = (reason, previous[1])

    def clear(self, component: str) -> None:
        if self._faults.pop(component, None) is not None:
            log.warning("recovered component=%s", component)

    def crashed(self, task: str, reason: str) -> None:
        """``task`` ended unexpectedly and is being restarted: degraded until ``recovered``."""
        self.restarts[task] = self.restarts.get(task, 0) + 1
        self.fault(f"task {task}", f"crashed ({reason}), restarting")

    def recovered(self, task: str) -> None:
        """The restarted ``task`` has run long enough to count as working again."""
        self.clear(f"task {task}")

    @property
    def task_restarts(self) -> int:
        return sum(self.restarts.values())

    def fail(self, reason: str) -> None:
        """Give up: the process must exit non-zero with ``reason``."""
        if not self.fatal.is_set():
            log.error("giving up: %s", reason)
            self.fatal_reason = reason
            self.fatal.set()

    @property
    def degraded(self) -> bool:
        return bool(self._faults)

    @property
    def reason(self) -> str:
        """``component: reason`` of each fault, oldest first; "" when all is well."""
        faults = sorted(self._faults.items(), key=lambda item: item[1][1])
        return "; ".join(f"{component}: {reason}" for component, (reason, _) in faults)

    @property
    def degraded_since(self) -> float:
        return min((since for _, since in self._faults.values()), default=0.0)
