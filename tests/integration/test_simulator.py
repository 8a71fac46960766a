"""The simulator over real sockets: Kite's official client, limits, faults, flood."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from kitewire import codec
from simulator.server import TickerServer

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def server():
    async with TickerServer(rate=20, heartbeat_interval=0.1) as running:
        yield running


def _url(server: TickerServer, api_key: str = "kitebus", token: str = "simulator") -> str:
    return f"{server.url}?api_key={api_key}&access_token={token}"


async def _next_ticks(ws: ClientConnection, timeout: float = 5.0) -> list[dict]:
    """Read frames until one carries ticks."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                ticks, _ = codec.decode_frame(message)
                if ticks:
                    return ticks


async def test_official_kite_client_connects_subscribes_and_parses(server: TickerServer) -> None:
    script = Path(__file__).with_name("official_client.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), server.url, "kitebus", "simulator",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    seen = json.loads(out)
    assert {t["instrument_token"] for t in seen["quote"]} == {408065, 256265}
    full = {t["instrument_token"]: t for t in seen["full"]}
    assert set(full) == {408065, 256265}
    infy = full[408065]
    assert len(infy["depth"]["buy"]) == 5 and len(infy["depth"]["sell"]) == 5
    assert infy["depth"]["buy"][0]["price"] <= infy["last_price"] <= infy["depth"]["sell"][0]["price"]
    assert infy["tradable"] is True and full[256265]["tradable"] is False
    assert seen["errors"] == []


async def test_plain_subscribe_streams_quote_then_mode_and_unsubscribe(server) -> None:
    async with connect(_url(server)) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": [408065]}))
        assert {t["mode"] for t in await _next_ticks(ws)} == {"quote"}
        await ws.send(json.dumps({"a": "mode", "v": ["ltp", [408065]]}))
        async with asyncio.timeout(5):
            while (await _next_ticks(ws))[0]["mode"] != "ltp":
                pass
        await ws.send(json.dumps({"a": "unsubscribe", "v": [408065]}))
        async with asyncio.timeout(5):  # heartbeats only from now on
            while True:
                message = await ws.recv()
                if message == codec.HEARTBEAT:
                    break
        assert server.sessions[0].modes == {}


async def test_bad_credentials_are_refused_at_the_handshake(server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(_url(server, token="expired")):
            pass
    assert refused.value.response.status_code == 403
    assert server.sessions == []


async def test_fourth_connection_per_api_key_is_refused(server) -> None:
    async with connect(_url(server)), connect(_url(server)), connect(_url(server)):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_url(server)):
                pass
        assert refused.value.response.status_code == 429
        assert len(server.sessions) == 3


async def test_instrument_3001_is_refused_with_an_error_message(server) -> None:
    async with connect(_url(server)) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": list(range(1 << 8 | 1, 3002 << 8 | 1, 256))}))
        async with asyncio.timeout(5):
            while not isinstance(message := await ws.recv(), str):
                pass
        assert json.loads(message)["type"] == "error"
        assert "3000" in json.loads(message)["data"]
        assert len(server.sessions[0].modes) == 3000


async def test_drop_cuts_the_socket_without_a_close_frame(server) -> None:
    async with connect(_url(server)) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": [408065]}))
        await _next_ticks(ws)
        assert server.drop() == 1
        with pytest.raises(ConnectionClosedError):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()


async def test_stall_sends_nothing_then_resumes(server) -> None:
    async with connect(_url(server)) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": [408065]}))
        await _next_ticks(ws)
        server.stall(1.5)
        with pytest.raises(TimeoutError):  # frames already in flight drain, then silence
            async with asyncio.timeout(1.2):
                while True:
                    await asyncio.wait_for(ws.recv(), 0.4)
        assert await _next_ticks(ws, timeout=5)


async def test_malformed_frame_and_error_message_reach_the_client(server) -> None:
    async with connect(_url(server)) as ws:
        await server.send_malformed()
        await server.send_error("TokenException: access token expired")
        frames = []
        async with asyncio.timeout(5):
            while len(frames) < 2:
                message = await ws.recv()
                if message != codec.HEARTBEAT:
                    frames.append(message)
        bad, text = frames
        assert codec.decode_frame(bad) == ([], 5)
        assert json.loads(text) == {"type": "error", "data": "TokenException: access token expired"}


async def test_refuse_connections_for_a_while(server) -> None:
    server.refuse_connections(0.3)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(_url(server)):
            pass
    assert refused.value.response.status_code == 503
    server.refuse_connections(0)
    async with connect(_url(server)):
        assert len(server.sessions) == 1


async def test_flood_delivers_the_requested_ticks(server) -> None:
    tokens = [t << 8 | 1 for t in range(1, 501)]
    async with connect(_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
        await ws.send(json.dumps({"a": "mode", "v": ["full", tokens]}))
        async with asyncio.timeout(5):
            while server.sessions[0].modes.get(tokens[-1]) != "full":
                await asyncio.sleep(0.01)
        server.stall(30)  # only the flood from now on
        flood = asyncio.create_task(server.flood(20_000))
        received = 0
        async with asyncio.timeout(30):
            while received < 20_000:
                message = await ws.recv()
                if isinstance(message, bytes) and len(message) > 1:
                    ticks, malformed = codec.decode_frame(message)
                    assert malformed == 0
                    received += sum(t["mode"] == "full" for t in ticks)
        assert await flood >= 20_000


@pytest.mark.parametrize("kind", ["prebuilt", "built"])
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "interleaved"])
async def test_line_rate_flood_delivers_whole_frames_and_waiting_sockets_keep_their_heartbeats(
    server, sequential: bool, kind: str
) -> None:
    """Two connections: every tick of the line-rate flood (from prebuilt frames, or built
    packet by packet as it goes) arrives intact on each, and while one floods, the other
    still hears heartbeats (Kite's idle signal) or flood frames."""
    tokens = [[t << 8 | 1 for t in range(1, 301)], [t << 8 | 1 for t in range(301, 601)]]
    per_connection = 30_000
    async with connect(_url(server), max_size=None) as a, connect(_url(server), max_size=None) as b:
        for ws, wanted in zip((a, b), tokens, strict=True):
            await ws.send(json.dumps({"a": "subscribe", "v": wanted}))
        async with asyncio.timeout(5):
            while sorted(len(s.modes) for s in server.sessions) != [300, 300]:
                await asyncio.sleep(0.01)

        prices: set[float] = set()

        async def count(ws) -> tuple[int, float]:
            received, longest_gap, last = 0, 0.0, time.monotonic()
            while received < per_connection:
                message = await ws.recv()
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now
                if isinstance(message, bytes) and len(message) > 1:
                    ticks, malformed = codec.decode_frame(message)
                    assert malformed == 0
                    if len(ticks) == 500:  # the flood's frames; the market's hold at most 300
                        received += len(ticks)
                        prices.update(t["last_price"] for t in ticks)
            return received, longest_gap

        async with asyncio.timeout(60):
            send = server.flood_line_rate if kind == "prebuilt" else server.flood_built
            flood = asyncio.create_task(send(per_connection, sequential=sequential))
            counts = await asyncio.gather(count(a), count(b))
            assert await flood == 2 * per_connection
        if kind == "built":  # each packet made as it went, its last price one of 5,000 in turn
            assert len(prices) == 5_000
        for received, longest_gap in counts:
            assert received == per_connection
            assert longest_gap < 3 * server.heartbeat_interval + 1  # never silent for long


async def _texts(ws: ClientConnection, n: int, timeout: float = 5.0) -> list[dict]:
    """The next ``n`` text messages, parsed."""
    out: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            message = await ws.recv()
            if isinstance(message, str):
                out.append(json.loads(message))
    return out


def _get(url: str) -> tuple[int, str, object]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], json.loads(exc.read())


async def test_orders_made_over_http_reach_every_socket_of_their_account_and_no_other() -> None:
    async with TickerServer(accounts={"other": "secret"}, heartbeat_interval=0.1) as server:
        ours = [await connect(_url(server)) for _ in range(3)]
        theirs = await connect(_url(server, "other", "secret"))
        base = f"http://127.0.0.1:{server.port}/orders"
        place = f"{base}/place?tradingsymbol=SBIN&quantity=10&price=960"
        status, kind, placed = await asyncio.to_thread(_get, place)
        assert (status, kind) == (200, "application/json")
        order_id = placed["order_id"]  # type: ignore[index]
        status, _, filled = await asyncio.to_thread(_get, f"{base}/fill?order_id={order_id}&quantity=4")
        assert status == 200 and filled["status"] == "UPDATE"  # type: ignore[index]
        await asyncio.to_thread(_get, f"{base}/cancel?order_id={order_id}")
        for ws in ours:
            messages = await _texts(ws, 3)
            assert [m["type"] for m in messages] == ["order"] * 3
            assert [m["data"]["status"] for m in messages] == ["OPEN", "UPDATE", "CANCELLED"]
            assert messages[0]["data"] == placed and messages[1]["data"]["filled_quantity"] == 4
        with pytest.raises(TimeoutError):
            await _texts(theirs, 1, timeout=0.5)
        status, _, listed = await asyncio.to_thread(_get, base)
        assert status == 200 and [o["status"] for o in listed] == ["CANCELLED"]  # type: ignore[union-attr]
        bad_requests = (
            f"{base}/fill?order_id={order_id}", f"{base}/place?tradingsymbol=NOPE&quantity=1",
            f"{base}/place?tradingsymbol=INFY&quantity=x", f"{base}/explode", f"{base}/fill?bogus=1",
        )  # fmt: skip
        for bad in bad_requests:
            status, kind, body = await asyncio.to_thread(_get, bad)
            assert (status, kind) == (400, "application/json") and body["error"], bad  # type: ignore[index]
        assert len(server.handshakes) == 4  # HTTP requests are not handshakes
        for ws in (*ours, theirs):
            await ws.close()


async def test_random_orders_come_on_every_socket_of_the_account() -> None:
    async with TickerServer(order_rate=50, heartbeat_interval=0.1) as server:
        sockets = [await connect(_url(server)) for _ in range(2)]
        first, second = [await _texts(ws, 10) for ws in sockets]
        assert first == second and all(m["type"] == "order" and m["data"]["order_id"] for m in first)
        for ws in sockets:
            await ws.close()
