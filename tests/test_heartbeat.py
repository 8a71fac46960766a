"""The library's heartbeat, without Redis: it rides out failures, and says what it is."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from config import Keys, SettingsError
from consumers.control import ControlClient
from consumers.heartbeat import Heartbeat
from consumers.kiteticker import KiteTicker
from consumers.subscriber import TickSubscriber
from tests.integration.conftest import eventually


class FlakyRedis:
    """HSET fails ``failures`` times (the first one hangs, as a dead socket does), then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.beats: list[dict[str, str]] = []
        self.deleted: list[tuple[str, ...]] = []

    async def hset(self, key: str, mapping: dict[str, str]) -> None:
        assert key == "kite:client_heartbeat"
        if self.failures:
            self.failures -= 1
            if not self.beats and self.failures % 2:
                await asyncio.Event().wait()
            raise redis.ConnectionError("connection refused")
        self.beats.append(mapping)

    async def hdel(self, key: str, *fields: str) -> None:
        self.deleted.append(fields)


async def test_a_heartbeat_rides_out_failed_and_hung_beats_and_its_close_deletes_it() -> None:
    fake = FlakyRedis(failures=3)
    heartbeat = Heartbeat(fake, Keys("kite"), timeout=0.3)  # type: ignore[arg-type]
    assert heartbeat.interval == pytest.approx(0.1)
    heartbeat.add("a")
    heartbeat.add("b")
    await eventually(lambda: len(fake.beats) >= 2, timeout=10)
    assert fake.failures == 0 and set(fake.beats[-1]) == {"a", "b"}
    await heartbeat.aclose()
    assert fake.deleted == [("a", "b")]
    count = len(fake.beats)
    await asyncio.sleep(0.3)  # stopped for good: no beat comes any more
    assert len(fake.beats) == count


async def test_a_session_request_says_so_and_ops_and_sessionless_requests_do_not() -> None:
    import fakeredis

    fake = fakeredis.FakeAsyncRedis()
    lib = ControlClient(fake, "kite", client_timeout=42)
    for op, tokens in (("subscribe", [1]), ("release", None), ("rebalance", None)):
        with pytest.raises(TimeoutError):  # no publisher: only the entry matters here
            await lib.request(op, tokens, client="lib", timeout=0.01)
    with pytest.raises(TimeoutError):
        await ControlClient(fake, "kite", session=False).request("subscribe", [1], client="ops", timeout=0.01)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await fake.xrange("kite:control")]
    assert [e.get("session") for e in entries] == ["42", None, None, None]
    assert lib.heartbeat is not None and lib.heartbeat.clients == {"lib"}
    await eventually(lambda: fake.hget("kite:client_heartbeat", "lib"))
    await lib.aclose()
    assert await fake.hgetall("kite:client_heartbeat") == {}


def test_a_bad_client_timeout_is_a_settings_error_for_every_library_entry_point(monkeypatch) -> None:
    monkeypatch.setenv("KITEBUS_CLIENT_TIMEOUT", "-1")
    for make in (
        lambda: TickSubscriber("redis://127.0.0.1:1/0"),
        lambda: KiteTicker(redis_url="redis://127.0.0.1:1/0", namespace="kite", redis_cluster=False),
        lambda: ControlClient(redis.Redis()),
    ):
        with pytest.raises(SettingsError, match="invalid setting KITEBUS_CLIENT_TIMEOUT: must be a number"):
            make()
    TickSubscriber("redis://127.0.0.1:1/0", session=False)  # no session: the setting is not needed
    ControlClient(redis.Redis(), session=False)
    monkeypatch.setenv("KITEBUS_CLIENT_TIMEOUT", "7.5")
    assert TickSubscriber("redis://127.0.0.1:1/0").client_timeout == 7.5
