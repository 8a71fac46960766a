"""Symbols everywhere: the publisher loads Kite's instruments dump into Redis and
resolves symbols in control requests; a bad source is loud and changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gzip
import http.server
import random
import shutil
import threading
from pathlib import Path

import pytest

from publisher.app import Publisher
from publisher.instruments import InstrumentsLoader
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
    await eventually(lambda: _status_is(rds, keys, "instruments", b"21"))  # 0 while it loads
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


async def _status_is(rds, keys, field: str, value: bytes) -> bool:
    return await rds.hget(keys.status, field) == value


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


def _long_line(path: Path) -> None:  # a proxy's error page where the dump should be
    path.write_text(INSTRUMENTS_CSV.read_text() + "<html>" + "x" * (200 << 10) + "</html>\n")


def _truncated_gzip(path: Path) -> None:
    packed = gzip.compress(INSTRUMENTS_CSV.read_bytes())
    path.write_bytes(packed[: len(packed) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(300_000))


def _gzipped_garbage(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b" + random.Random(7).randbytes(300_000))


BAD_SOURCES = [
    (_long_line, "field larger than field limit"),
    (_truncated_gzip, "truncated gzip"),
    (_garbage, "not UTF-8"),
    (_gzipped_garbage, "broken gzip"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD_SOURCES, ids=[f.__name__[1:] for f, _ in BAD_SOURCES])
async def test_a_bad_source_at_start_is_reported_and_the_publisher_serves(
    settings, rds, keys, tmp_path, spoil, message
) -> None:
    path = tmp_path / "instruments.csv"
    spoil(path)
    publisher = Publisher(settings.model_copy(update={"instruments": str(path)}), FAST)
    try:
        async with asyncio.timeout(20):
            await publisher.start()
        assert message in publisher.instruments.error and publisher.instruments.count == 0
        await eventually(lambda: _status_error(rds, keys, message))
        await eventually(lambda: all(c.state == "live" for c in publisher.connections))
        result = await _request(rds, keys, op="subscribe", tokens=str(INFY), mode="ltp")
        assert result["ok"] == "1"  # tokens work; symbols are unknown until a good load
        result = await _request(rds, keys, op="subscribe", tokens="NSE:INFY")
        assert "unknown instrument NSE:INFY" in result["error"]
        shutil.copy(INSTRUMENTS_CSV, path)
        publisher.instruments.reload()  # the refresh task picks up the repaired source
        await eventually(lambda: _status_is(rds, keys, "instruments", b"21"))
        assert await rds.hget(keys.status, "instruments_error") == b""
    finally:
        await publisher.stop()


async def test_a_refresh_that_fails_keeps_the_last_good_dump_and_the_task(settings, rds, keys, tmp_path):
    path = tmp_path / "instruments.csv"
    shutil.copy(INSTRUMENTS_CSV, path)
    publisher = Publisher(settings.model_copy(update={"instruments": str(path)}), FAST)
    await publisher.start()
    try:
        for spoil, message in BAD_SOURCES:
            spoil(path)
            publisher.instruments.reload()  # as the daily refresh would
            await eventually(lambda m=message: _status_error(rds, keys, m))
            assert publisher.instruments._task is not None and not publisher.instruments._task.done()
            assert await rds.hget(keys.instruments, "NSE:INFY") == b"408065"  # the last good one
            assert publisher.instruments.count == 21
        path.write_text(INSTRUMENTS_CSV.read_text().replace("INFY", "INFOSYS"))
        publisher.instruments.reload()
        await eventually(lambda: rds.hget(keys.instruments, "NSE:INFOSYS"))
        await eventually(lambda: _status_is(rds, keys, "instruments_error", b""))
    finally:
        await publisher.stop()


async def test_a_source_that_trickles_forever_times_out_in_total(settings, rds, keys) -> None:
    """Headers, then a byte every 20 ms of a dump that never ends: each read gets
    something, so only a deadline over the whole fetch ends it."""
    handlers: set[asyncio.Task[None]] = set()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 99999999\r\n\r\n")
            writer.write(INSTRUMENTS_CSV.read_bytes()[:200])
            while True:
                writer.write(b"1")
                await writer.drain()
                await asyncio.sleep(0.02)  # the server's pace, not the test's synchronisation
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/instruments?api_key=k3y&access_token=t0k"
    tuning = dataclasses.replace(FAST, instruments_timeout=1.0)
    publisher = Publisher(settings.model_copy(update={"instruments": url}), tuning)
    try:
        async with asyncio.timeout(10):
            await publisher.start()  # the deadline, not the trickle, ends the first load
        assert "not read within 1s" in publisher.instruments.error
        await eventually(lambda: _status_error(rds, keys, "not read within 1s"))
        await eventually(lambda: all(c.state == "live" for c in publisher.connections))
        error = (await rds.hget(keys.status, "instruments_error")).decode()
        assert "api_key=***&access_token=***" in error and "k3y" not in error and "t0k" not in error
    finally:
        await publisher.stop()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_source_too_big_is_refused(rds, keys, tmp_path) -> None:
    path = tmp_path / "instruments.csv"
    shutil.copy(INSTRUMENTS_CSV, path)
    small = InstrumentsLoader(rds, keys, str(path), max_bytes=500)
    assert await small.load() is False and "larger than 500 bytes" in small.error
    path.write_bytes(gzip.compress(INSTRUMENTS_CSV.read_bytes() * 5))  # small packed, big unpacked
    small.max_bytes = 2000
    assert await small.load() is False and "larger than 2,000 bytes unpacked" in small.error
    assert await InstrumentsLoader(rds, keys, str(path)).load() is True  # gzip is fine within the cap


async def test_a_url_with_credentials_is_masked_in_the_error(rds, keys) -> None:
    loader = InstrumentsLoader(rds, keys, "http://kite:hunter2@127.0.0.1:1/instruments?api_key=k3y")
    assert await loader.load() is False
    assert "kite:***@127.0.0.1:1" in loader.error and "api_key=***" in loader.error
    assert "hunter2" not in loader.error and "k3y" not in loader.error
