"""``redis+sentinel://`` URLs: parsed, or refused with a clear reason (never quoting a password)."""

from __future__ import annotations

import pytest

from config import SettingsError, load_settings
from config.redisurl import SentinelURL, is_sentinel_url, parse_sentinel_url
from rediswire import bus


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("redis+sentinel://s1:26379/mymaster", SentinelURL((("s1", 26379),), "mymaster")),
        ("redis+sentinel://a:1,b:2,c:3/svc/4", SentinelURL((("a", 1), ("b", 2), ("c", 3)), "svc", 4)),
        ("redis+sentinel://u:p%40ss@a:1/svc", SentinelURL((("a", 1),), "svc", 0, "u", "p@ss")),
        ("redis+sentinel://:pw@a:1/svc/2/", SentinelURL((("a", 1),), "svc", 2, None, "pw")),
        ("redis+sentinel://sentinel/mymaster", SentinelURL((("sentinel", 26379),), "mymaster")),
        ("redis+sentinel://[::1]:5000/svc", SentinelURL((("::1", 5000),), "svc")),
    ],
)
def test_good_urls(url: str, parsed: SentinelURL) -> None:
    assert is_sentinel_url(url)
    assert parse_sentinel_url(url) == parsed
    assert load_settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://a:1", "names the service after the hosts"),
        ("redis+sentinel://a:1/", "names the service after the hosts"),
        ("redis+sentinel:///svc", "at least one sentinel"),
        ("redis+sentinel://a:port/svc", "port 'port' is not a number"),
        ("redis+sentinel://a:0/svc", "port '0' is not a number from 1 to 65535"),
        ("redis+sentinel://a:1,b:70000/svc", "'b:70000'"),
        ("redis+sentinel://a:1/svc/x", "database 'x' is not a number"),
        ("redis+sentinel://a:1/svc/1/2", "nothing more"),
        ("redis+sentinel://a:1/svc?db=1", "no query"),
        ("redis+sentinel://a:1,:2/svc", "has no host"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as parsed:
        parse_sentinel_url(url)
    assert reason in str(parsed.value)
    with pytest.raises(SettingsError) as settings:
        load_settings(redis_url=url)
    assert str(settings.value).startswith("invalid setting REDIS_URL: ") and reason in str(settings.value)


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(redis_url="redis+sentinel://user:hunter22@a:notaport/svc")
    assert "hunter22" not in str(error.value) and "user:***@" in str(error.value)


def test_sentinel_does_not_go_with_cluster() -> None:
    with pytest.raises(SettingsError, match="KITEBUS_REDIS_CLUSTER"):
        load_settings(redis_url="redis+sentinel://a:1/svc", redis_cluster=True)
    with pytest.raises(ValueError, match="KITEBUS_REDIS_CLUSTER"):
        bus.connect("redis+sentinel://a:1/svc", True)


async def test_the_client_and_the_tick_socket_take_the_credentials_and_db() -> None:
    url = "redis+sentinel://u:p%40ss@127.0.0.1:1,127.0.0.1:2/svc/3"
    client = bus.connect(url, None)
    try:
        pool = client.connection_pool
        assert bus.is_sentinel(client) and isinstance(pool, bus.FollowingPool)
        assert (pool.service_name, pool.url) == ("svc", url)
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "u", "p@ss")
        ports = [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels]
        assert ports == [1, 2]
    finally:
        await client.aclose()
    target = parse_sentinel_url(url)
    assert target.node_url("10.0.0.5", 6380) == "redis://u:p%40ss@10.0.0.5:6380/3"
    assert target.redacted() == "redis+sentinel://u:***@127.0.0.1:1,127.0.0.1:2/svc/3"


async def test_no_sentinel_answering_is_a_connection_error() -> None:
    from kitebus.localredis import free_port

    with pytest.raises(ConnectionError, match="no sentinel names a primary for 'svc'"):
        await bus.topology(f"redis+sentinel://127.0.0.1:{free_port()}/svc", False)
