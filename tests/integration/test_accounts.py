"""Several Kite accounts behind one namespace: capacity adds up, placement spans every
connection of every account, each api_key keeps Kite's limit of 3 sockets."""

from __future__ import annotations

import json

import pytest

from config import SettingsError, load_settings
from publisher.app import Publisher
from simulator.server import TickerServer
from tests.integration.conftest import FAST, eventually

SECOND = {"name": "second", "api_key": "kitebus-2", "access_token": "simulator-2"}


@pytest.fixture
async def two_account_simulator():
    async with TickerServer(rate=10, heartbeat_interval=0.2, accounts={"kitebus-2": "simulator-2"}) as server:
        yield server


async def test_two_accounts_hold_their_own_sockets_and_add_up_capacity(
    two_account_simulator, redis_url, control, rds, keys, monkeypatch
) -> None:
    simulator = two_account_simulator
    monkeypatch.setenv("KITEBUS_ACCOUNTS", json.dumps([SECOND]))
    settings = load_settings(
        kite_ws_url=simulator.url, redis_url=redis_url, kite_api_key="kitebus", kite_access_token="simulator",
        namespace="kite", connections=2, tokens_per_connection=3,
    )  # fmt: skip
    assert settings.total_connections == 4 and settings.capacity == 12
    publisher = Publisher(settings, FAST)
    await publisher.start()
    try:
        await eventually(lambda: len(simulator.sessions) == 4)
        keys_at_kite = sorted(s.api_key for s in simulator.sessions)
        assert keys_at_kite == ["kitebus", "kitebus", "kitebus-2", "kitebus-2"]
        tokens = [(i << 8) | 1 for i in range(1, 14)]
        result = await control.request("subscribe", tokens, client="s")
        assert result.applied == tuple(tokens[:12]) and result.rejected == (tokens[12],)  # 4 x 3
        await eventually(lambda: sorted(len(s.modes) for s in simulator.sessions) == [3, 3, 3, 3])
        assert {int(v) for v in (await rds.hgetall(keys.token_conn)).values()} == {0, 1, 2, 3}
        await eventually(lambda: rds.hget(keys.conn(3), "account"))
        assert await rds.hget(keys.conn(3), "account") == b"second"
        assert await rds.hget(keys.conn(0), "account") == b"default"
        assert await rds.hget(keys.status, "capacity") == b"12"
    finally:
        await publisher.stop()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "KITEBUS_ACCOUNTS: not valid JSON"),
        (json.dumps([{"name": "b", "api_key": "k"}]), r"ACCOUNTS\[0\]: account 'b' needs access_token"),
        (json.dumps([SECOND, {**SECOND, "name": "third"}]), "two accounts have the same api_key"),
    ],
)
def test_a_bad_accounts_setting_is_one_line_naming_it_and_never_shows_a_secret(monkeypatch, value, message):
    monkeypatch.setenv("KITEBUS_ACCOUNTS", value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings()
    assert "simulator-2" not in str(caught.value) and "\n" not in str(caught.value)


def test_an_account_repeating_the_default_api_key_is_refused_at_start(monkeypatch) -> None:
    monkeypatch.setenv("KITEBUS_ACCOUNTS", json.dumps([{**SECOND, "api_key": "kitebus"}]))
    settings = load_settings(kite_api_key="kitebus", kite_access_token="simulator")
    with pytest.raises(SettingsError, match="account 'second' repeats KITE_API_KEY"):
        Publisher(settings)
