"""Fixtures that run the real parts: the simulator, a publisher, Redis clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from config import Keys, Settings, load_settings
from consumers.control import ControlClient
from publisher.app import Publisher, Tuning
from simulator.server import TickerServer

INSTRUMENTS_CSV = Path(__file__).parent.parent / "data" / "instruments.csv"  # a small dump in Kite's format
FAST = Tuning(stall_timeout=1.0, backoff_base=0.05, backoff_cap=0.5, auth_retry=0.5, status_interval=0.1)


async def eventually(check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy (or raise after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout}s (last value: {last!r})")


@pytest.fixture
async def simulator() -> AsyncIterator[TickerServer]:
    # The simulator shares the test's event loop with the publisher: keep its load modest.
    async with TickerServer(rate=10, max_rate=1000, heartbeat_interval=0.2) as server:
        yield server


@pytest.fixture
def settings(redis_url: str, simulator: TickerServer) -> Settings:
    return load_settings(
        kite_ws_url=simulator.url, redis_url=redis_url, kite_api_key="kitebus",
        kite_access_token="simulator", namespace="kite", instruments=str(INSTRUMENTS_CSV),
    )  # fmt: skip


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys("kite")


@pytest.fixture
async def control(rds: redis.Redis) -> AsyncIterator[ControlClient]:
    client = ControlClient(rds, "kite")  # its claims are a session's: this test's heartbeat keeps them
    yield client
    await client.aclose()


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    running = Publisher(settings, FAST)
    await running.start()
    await eventually(lambda: all(c.state == "live" for c in running.connections))
    yield running
    await running.stop()
