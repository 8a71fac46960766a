"""The private redis-server fixture really serves."""

from __future__ import annotations

import redis.asyncio as redis


async def test_private_redis_answers_and_is_flushed(redis_url: str) -> None:
    client = redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert (await client.info("server"))["tcp_port"] == int(redis_url.rsplit(":", 1)[1].split("/")[0])
    finally:
        await client.aclose()
