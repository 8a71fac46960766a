"""Symbols everywhere: the publisher loads Kite's instruments dump into Redis and
resolves symbols in control requests; a bad source is loud and changes nothing."""

from __future__ import annotations

import asyncio
import functools
import http.server
import shutil
import threading

from publisher.app import Publisher
from tests.integration.conftest import FAST, INSTRUMENTS_CSV, eventually
from tests.integration.test_cli import kitebus

INFY, NIFTY, MM = 408065, 256265, 519937


async def _request(rds, keys, **fields: str) -> dict[str, str]:
    entry = (await rds.xadd(keys.control, fields)).decode()

    async def result() -> dict[str, str] | None:
        for _, found in await rds.xrange(keys.control_results):
            if found[b"request"].decode() == entry:
                return {k.decode(): v.decode() for k, v in found.items()}
        return None

    return await eventually(result)


async def test_the_dump_is_in_redis_both_ways_and_requests_take_symbols(publisher, rds, keys) -> None:
    assert await rds.hget(keys.instruments, "NSE:INFY") == b"408065"
    assert await rds.hget(keys.instruments, "256265") == b"NSE:NIFTY 50"
    await eventually(lambda: rds.hget(keys.status, "instruments"))
    assert int(await rds.hget(keys.status, "instruments")) == 21
    assert await rds.hget(keys.status, "instruments_error") == b""

    result = await _request(rds, keys, op="subscribe", tokens="nse:infy, NSE:NIFTY 50,NSE:M&M", mode="full")
    assert result["ok"] == "1" and result["applied"] == f"{INFY},{NIFTY},{MM}"
    assert publisher.book.claims["default"] == {INFY: "full", NIFTY: "full", MM: "full"}


async def test_unknown_symbols_are_rejected_by_name_and_nothing_changes(publisher, rds, keys) -> None:
    await _request(rds, keys, op="subscribe", tokens=str(INFY), client="s")
    result = await _request(rds, keys, op="set", tokens="NSE:TCS,NSE:NOPE,BSE:NADA", client="s")
    assert result["ok"] == "0" and result["error"] == "unknown instruments NSE:NOPE, BSE:NADA"
    assert publisher.book.claims == {"s": {INFY: "quote"}}
    result = await _request(rds, keys, op="subscribe", tokens="NSE:INFY 408065", client="s")
    assert "unknown instrument NSE:INFY 408065 (separate a symbol" in result["error"]


async def test_a_bad_source_is_loud_and_the_last_good_dump_stays(settings, rds, keys, tmp_path, redis_url):
    path = tmp_path / "instruments.csv"
    shutil.copy(INSTRUMENTS_CSV, path)
    publisher = Publisher(settings.model_copy(update={"instruments": str(path)}), FAST)
    await publisher.start()
    try:
        assert publisher.instruments.count == 21 and publisher.instruments.error == ""
        broken_files = [("", "not a Kite instruments dump"), (b"\xff\xfe", "not UTF-8"), (None, "No such")]
        for broken, message in broken_files:
            if broken is None:
                path.unlink()
            elif isinstance(broken, bytes):
                path.write_bytes(broken)
            else:
                path.write_text(broken)
            assert await publisher.instruments.load() is False
            assert message in publisher.instruments.error
            await eventually(lambda m=message: _status_error(rds, keys, m))
            assert await rds.hget(keys.instruments, "NSE:INFY") == b"408065"  # the last good one
        _, out, _ = await kitebus(redis_url, "status")
        assert "INSTRUMENTS: " in out and "No such file" in out and "the last good dump stays in use" in out
        path.write_text(INSTRUMENTS_CSV.read_text().replace("INFY", "INFOSYS"))
        assert await publisher.instruments.load() is True and publisher.instruments.error == ""
        assert await rds.hget(keys.instruments, "NSE:INFOSYS") == b"408065"
        assert await rds.hget(keys.instruments, "NSE:INFY") is None  # replaced whole, not merged
    finally:
        await publisher.stop()


async def _status_error(rds, keys, message: str) -> bool:
    return message in (await rds.hget(keys.status, "instruments_error") or b"").decode()


async def test_the_source_may_be_a_url(settings, rds, keys) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(INSTRUMENTS_CSV.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{INSTRUMENTS_CSV.name}"
    publisher = Publisher(settings.model_copy(update={"instruments": url}), FAST)
    try:
        await publisher.start()
        assert publisher.instruments.count == 21
        assert await rds.hget(keys.instruments, "NFO:NIFTY25DECFUT") is not None
        assert await publisher.instruments.load() is True
        missing = Publisher(settings.model_copy(update={"instruments": url + ".gone"}), FAST)
        assert await missing.instruments.load() is False and "404" in missing.instruments.error
        await missing.redis.aclose()
    finally:
        await publisher.stop()
        await asyncio.to_thread(server.shutdown)
        server.server_close()
