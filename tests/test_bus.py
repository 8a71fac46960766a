"""rediswire/bus.py: what tells a Redis Cluster from one server, without a server."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from config import load_settings
from config.settings import SettingsError
from rediswire import bus


def test_node_url_keeps_scheme_and_credentials_and_uses_db_0() -> None:
    seed = "rediss://ops:s%40cret@10.0.0.1:7000/0"
    assert bus.node_url(seed, "10.0.0.2", 7001) == "rediss://ops:s%40cret@10.0.0.2:7001/0"
    assert bus.node_url("redis://127.0.0.1:7000", "127.0.0.1", 7002) == "redis://127.0.0.1:7002/0"


def test_a_single_server_is_one_node_that_serves_every_name() -> None:
    topology = bus.Topology.single("redis://x:1/0")
    assert not topology.cluster and topology.node_of(b"kite:ticks:1") == 0


def test_a_cluster_topology_routes_by_the_slot_of_the_name() -> None:
    owner = tuple(0 if slot < 8192 else 1 for slot in range(bus.SLOTS))
    topology = bus.Topology(("redis://a:1/0", "redis://b:2/0"), owner)
    for name in (b"kite:ticks:408065", b"kite:last", b"kite:control"):
        assert topology.node_of(name) == (0 if key_slot(name) < 8192 else 1)


def test_a_slot_nobody_serves_is_an_error_naming_it() -> None:
    topology = bus.Topology(("redis://a:1/0",), (-1,) * bus.SLOTS)
    with pytest.raises(bus.RespError, match="CLUSTERDOWN"):
        topology.node_of(b"kite:last")


def test_publish_command_and_env_flag(monkeypatch) -> None:
    assert bus.publish_command(True) == b"SPUBLISH" and bus.publish_command(False) == b"PUBLISH"
    monkeypatch.setenv("KITEBUS_REDIS_CLUSTER", "1")
    assert bus.cluster_from_env() and load_settings().redis_cluster
    assert bus.is_cluster(bus.connect("redis://127.0.0.1:1/0"))
    monkeypatch.setenv("KITEBUS_REDIS_CLUSTER", "0")
    assert not bus.cluster_from_env() and not bus.is_cluster(bus.connect("redis://127.0.0.1:1/0"))


def test_a_cluster_needs_a_tcp_url_and_a_bad_flag_names_its_variable(monkeypatch) -> None:
    monkeypatch.setenv("KITEBUS_REDIS_CLUSTER", "1")
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock")
    with pytest.raises(SettingsError, match=r"^invalid setting REDIS_URL: .*KITEBUS_REDIS_CLUSTER=1"):
        load_settings()
    monkeypatch.setenv("KITEBUS_REDIS_CLUSTER", "perhaps")
    with pytest.raises(SettingsError, match=r"^invalid setting KITEBUS_REDIS_CLUSTER"):
        load_settings()


class _Info:
    def __init__(self, reply: dict) -> None:
        self.reply = reply

    async def info(self, section: str) -> dict:
        assert section == "server"
        return self.reply


async def test_a_redis_older_than_7_is_named_and_refused() -> None:
    """The fenced writes' scripts need Redis 7: an older server must be a clear error at
    start, not a publisher retrying its first write for ever (found by review)."""
    with pytest.raises(bus.RedisTooOld, match=r"Redis 6\.2 is too old: kitebus needs Redis 7\.0 or later"):
        await bus.require_version(_Info({"redis_version": "6.2.14"}))
    await bus.require_version(_Info({"redis_version": "7.0.15"}))
    cluster = {"127.0.0.1:7000": {"redis_version": "7.2.4"}, "127.0.0.1:7001": {"redis_version": "6.0.16"}}
    with pytest.raises(bus.RedisTooOld, match=r"Redis 6\.0 is too old"):
        await bus.require_version(_Info(cluster))  # every node counts
