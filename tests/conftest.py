"""Shared fixtures: a private redis-server on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kitebus.localredis import LocalRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A real redis-server for the whole session, always stopped at the end."""
    server = LocalRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """The server's URL, with every database flushed before each test."""
    redis_server.flush()
    return redis_server.url
