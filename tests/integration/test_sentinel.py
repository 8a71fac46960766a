"""Redis Sentinel with real processes: a primary, a replica and a sentinel (quorum 1) on
loopback, the simulator, a publisher and the library, all given only the
``redis+sentinel://`` URL. A manual ``SENTINEL FAILOVER`` and a primary killed outright
must each leave ticks flowing for every claim (``seq`` in order), every claim on the new
primary, control requests answered, none twice, and Kite's sockets untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from bench.redis_faults import measure
from config import load_settings
from consumers.control import ControlClient
from consumers.subscriber import TickSubscriber
from kitebus.localredis import LocalSentinelSet
from publisher.app import Publisher
from rediswire import bus
from tests.integration.conftest import FAST, INSTRUMENTS_CSV, eventually
from tests.integration.test_cli import kitebus

INFY, NIFTY = 408065, 256265


@pytest.fixture
def sentinels() -> Iterator[LocalSentinelSet]:
    stack = LocalSentinelSet(1)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def sentinel_publisher(sentinels: LocalSentinelSet, simulator) -> AsyncIterator[Publisher]:
    settings = load_settings(
        kite_ws_url=simulator.url, redis_url=sentinels.url, kite_api_key="kitebus",
        kite_access_token="simulator", namespace="kite", instruments=str(INSTRUMENTS_CSV),
    )  # fmt: skip
    running = Publisher(settings, FAST)
    await running.start()
    await eventually(lambda: all(c.state == "live" for c in running.connections))
    yield running
    await running.stop()


async def _kill(sentinels: LocalSentinelSet, port: int) -> None:
    server = sentinels.server(port)
    assert server.process is not None
    server.process.kill()
    await asyncio.to_thread(server.process.wait)


async def _fail_over(sentinels: LocalSentinelSet, kill: bool) -> int:
    """Fail over (or kill the primary); the new primary's port, once the sentinel names it."""
    old = sentinels.primary_port()
    if kill:
        await _kill(sentinels, old)
    else:
        sentinels.sentinels[0].failover()
    await eventually(lambda: asyncio.to_thread(lambda: sentinels.primary_port() != old), timeout=30)
    return sentinels.primary_port()


@pytest.mark.parametrize("kill", [False, True], ids=["sentinel_failover", "primary_killed"])
async def test_the_library_publisher_and_cli_follow_the_primary(
    sentinels: LocalSentinelSet, sentinel_publisher: Publisher, simulator, kill: bool
) -> None:
    url = sentinels.url
    admin = bus.connect(url, False)
    control = ControlClient(admin, "kite")
    try:
        async with TickSubscriber(url, client="strat", namespace="kite") as sub:
            assert (await sub.subscribe([INFY, NIFTY], mode="full")).ok
            seen: dict[int, list[int]] = {INFY: [], NIFTY: []}

            async def ticks_of_both(after: dict[int, int]) -> bool:
                for tick in await sub.batch(limit=100, wait=0.1):
                    seen[tick["instrument_token"]].append(tick["seq"])
                return all(len(seen[t]) > after[t] for t in seen)

            await eventually(lambda: ticks_of_both({INFY: 0, NIFTY: 0}))
            handshakes = len(simulator.handshakes)
            old = sentinels.primary_port()
            new = await _fail_over(sentinels, kill)
            before = {t: len(s) for t, s in seen.items()}
            await eventually(lambda: ticks_of_both(before), timeout=15)
            more = {t: len(s) + 2 for t, s in seen.items()}
            await eventually(lambda: ticks_of_both(more), timeout=15)
            if kill:
                assert sub.reconnects >= 1  # the pub/sub reader moved to the new primary
            # After SENTINEL FAILOVER the old primary serves on as a replica, and Redis
            # replicates PUBLISH to replicas, so the reader may stay where it was; the test
            # of following is that ticks go on once that server is gone too.
            for token, seqs in seen.items():  # one epoch: every tick once, in order
                assert seqs == sorted(set(seqs)), (token, seqs)
            assert len(simulator.handshakes) == handshakes  # only Redis failed
            # the claims are on the new primary, and a request is answered there
            primary = bus.connect(f"redis://127.0.0.1:{new}/0", False)
            try:
                claims = await primary.hgetall("kite:claims:strat")
                assert claims == {b"408065": b"full", b"256265": b"full"}
                result = await control.subscribe([884737], mode="ltp", client="ops", timeout=15)
                assert result.ok and await primary.hget("kite:claims:ops", "884737") == b"ltp"
            finally:
                await primary.aclose()
            code, out, _ = await kitebus(url, "status", "--json", "--sample", "0")
            assert json.loads(out)["redis"] == f"primary 127.0.0.1:{new} via sentinel service mymaster"
            code, out, _ = await kitebus(url, "status", "--sample", "0")
            assert f"redis: primary 127.0.0.1:{new} via sentinel service mymaster" in out
            code, out, _ = await kitebus(url, "ctl", "unsubscribe", "884737", "--client", "ops")
            assert code == 0 and out.startswith("ok: unsubscribe")
            code, out, _ = await kitebus(url, "tail", str(INFY), "--count", "1")
            assert code == 0 and out.strip()
            if not kill:
                await _kill(sentinels, old)
                before = {t: len(s) for t, s in seen.items()}
                await eventually(lambda: ticks_of_both(before), timeout=15)
                more = {t: len(s) + 2 for t, s in seen.items()}
                await eventually(lambda: ticks_of_both(more), timeout=15)
                assert sub.reconnects >= 1
                for token, seqs in seen.items():
                    assert seqs == sorted(set(seqs)), (token, seqs)
    finally:
        await admin.aclose()


def _held(figures) -> None:
    assert figures.ok, figures.problems
    assert figures.answered_twice == 0 and figures.leaders == 1 and figures.handshakes == 0
    assert figures.named_s is not None
    assert figures.first_tick_s is not None and figures.first_tick_s < 10
    assert figures.all_ticking_s is not None and figures.all_ticking_s < 10
    assert figures.claims_back_s is not None and figures.claims_back_s < 10
    assert figures.request_answered_s is not None and figures.request_answered_s < 10


@pytest.mark.parametrize("kind", ["sentinel_failover", "primary_killed"])
async def test_a_publisher_process_follows_a_failover(kind: str) -> None:
    """``python -m publisher`` with the sentinel URL, two clients' claims over 100 tokens,
    a consumer checking ``seq`` and a client whose requests keep coming."""
    _held(await measure(kind, 0, tokens=100))
