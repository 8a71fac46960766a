"""Results that mean "live": a follow-up entry once each newly subscribed token has ticked.

A subscribe (or set) result says the request was applied. For its newly subscribed
tokens the publisher then watches the tick flow: when each has had a tick published on
its channel (a PUBLISH Redis acknowledged, noted by the sink: ticks conflated, dropped or
refused do not count), or ``timeout`` seconds passed, it writes a second entry to
``{ns}:control:results`` for the same request: op ``live``, ``applied`` the tokens that
ticked, ``rejected`` the silent ones, named in ``error`` too. Tokens that were already
subscribed count as live at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from config.keys import RESULTS_MAXLEN, Keys
from publisher.health import Health
from publisher.lease import Fence
from publisher.sink import TickSink
from publisher.supervisor import supervised
from rediswire import bus
from rediswire.bus import REDIS_FAULTS
from rediswire.tasks import Backoff, cancel_and_wait

log = logging.getLogger("kitebus.live")

POLL = 0.005  # seconds between looks at the tick flow while a request waits


@dataclass
class _Waiter:
    request: str
    client: str
    deadline: float
    waiting: set[int]  # tokens watched, not yet published
    watched: list[int]  # what to unwatch in the sink once done
    live: list[int] = field(default_factory=list)


class LiveWatch:
    """Owns the task that writes the ``live`` follow-ups."""

    def __init__(
        self, client: bus.Client, keys: Keys, sink: TickSink,
        timeout: float = 10.0, *, fence: Fence | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._sink = sink
        self.timeout = timeout
        self._fence = fence or Fence()
        self.health = Health()  # the publisher's, once it is given one
        self._waiters: list[_Waiter] = []
        self._unsent: list[dict[str, str]] = []  # follow-ups due, not yet written (Redis away)
        self.problem = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def before(self, new: list[int]) -> dict[int, None]:
        """Start noting which of the tokens about to be subscribed go out: call before
        telling Kite, whose first tick can come at once."""
        self._sink.watch(new)
        return dict.fromkeys(new)

    def watch(self, request: str, client: str, before: dict[int, None], already_live: list[int]) -> None:
        """Start watching a request's newly subscribed tokens (``before``: from ``before()``)."""
        watched = list(before)
        waiter = _Waiter(request, client, time.monotonic() + self.timeout, set(watched), watched)
        waiter.live.extend(already_live)
        self._waiters.append(waiter)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(supervised("live-watch", self._run, self.health), name="live-watch")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for waiter in self._waiters:
            self._sink.unwatch(waiter.watched)
        self._waiters.clear()

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            if not self._waiters and not self._unsent:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(POLL)
            now = time.monotonic()
            for waiter in list(self._waiters):
                if self._progress(waiter) or now >= waiter.deadline:
                    self._waiters.remove(waiter)
                    self._sink.unwatch(waiter.watched)
                    self._unsent.append(self._result(waiter))
            if not self._unsent:
                continue
            if not self._fence.valid():
                if not self._fence.lapsed:  # another publisher leads: the requests are its own now
                    self._unsent.clear()
                await self._fence.wait_valid()
                continue
            try:
                await self._write()
                self.problem = ""
                backoff.reset()
            except REDIS_FAULTS as exc:  # kept, and written once Redis takes them
                if not self.problem:
                    log.warning("live follow-ups not written yet count=%d error=%s", len(self._unsent), exc)
                self.problem = bus.describe(exc)
                await backoff.wait()

    def _progress(self, waiter: _Waiter) -> bool:
        """Note tokens published since the watch; True once every one was."""
        went_out = self._sink.went_out
        for token in [t for t in waiter.waiting if t in went_out]:
            waiter.waiting.discard(token)
            waiter.live.append(token)
        return not waiter.waiting

    def _result(self, waiter: _Waiter) -> dict[str, str]:
        silent = sorted(waiter.waiting)
        error = f"no tick within {self.timeout:g}s from: {','.join(map(str, silent))}" if silent else ""
        level = logging.WARNING if silent else logging.INFO
        log.log(level, "live request=%s live=%d silent=%d", waiter.request, len(waiter.live), len(silent))
        return {
            "request": waiter.request, "op": "live", "client": waiter.client, "ok": "0" if silent else "1",
            "error": error, "applied": _text(waiter.live), "rejected": _text(silent),
        }  # fmt: skip

    async def _write(self) -> None:
        """The follow-ups due, in order, in one transaction: all written or none."""
        async with bus.fenced(self._redis, self._fence) as pipe:
            for result in self._unsent:
                pipe.xadd(self._keys.control_results, result, maxlen=RESULTS_MAXLEN, approximate=True)
            await pipe.execute()
        self._unsent.clear()


def _text(tokens: list[int]) -> str:
    return ",".join(map(str, tokens))
