"""The morning path: Kite's daily logout, refusals, `kitebus ctl token`, all back without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

from publisher.app import Publisher
from simulator.server import subscribed
from tests.integration.conftest import FAST, eventually

INFY, NIFTY, TCS = 408065, 256265, 2953217
SLOW_AUTH_RETRY = dataclasses.replace(FAST, auth_retry=60.0)  # only a new token can bring it back soon


async def _kitebus(settings, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    env = {
        **os.environ, "REDIS_URL": settings.redis_url, "KITEBUS_NAMESPACE": "kite",
        "KITE_ACCESS_TOKEN_FILE": str(settings.kite_access_token_file),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kitebus", *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_the_morning_path_end_to_end(simulator, settings, control, rds, keys, tmp_path, caplog) -> None:
    token_file = tmp_path / "access_token"
    token_file.write_text("simulator\n")
    settings = settings.model_copy(update={"kite_access_token": None, "kite_access_token_file": token_file})
    caplog.set_level(logging.DEBUG)
    publisher = Publisher(settings, SLOW_AUTH_RETRY)
    await publisher.start()
    try:
        await eventually(lambda: all(c.state == "live" for c in publisher.connections))
        await control.subscribe([INFY, TCS], mode="full", client="a")
        await control.subscribe([NIFTY], mode="ltp", client="b")
        wanted = {INFY: "full", TCS: "full", NIFTY: "ltp"}

        def at_kite() -> dict[int, str]:
            return {t: m for modes in subscribed(simulator).values() for t, m in modes.items()}

        await eventually(lambda: at_kite() == wanted)

        # 06:00: Kite logs everybody out; the old token is refused from now on.
        assert await simulator.rotate_access_token("day-2") == 3
        await eventually(lambda: all(c.state == "auth_failed" for c in publisher.connections))
        assert all(c.auth_failed_at > 0 for c in publisher.connections)
        await eventually(lambda: rds.hget(keys.conn(0), "auth_failed_at"))
        code, out, _ = await _kitebus(settings, "status", "--sample", "0.1")
        assert "ACCESS TOKEN REFUSED by Kite" in out and "kitebus ctl token" in out

        # The ops person runs the login script, which ends in `kitebus ctl token`.
        code, out, err = await _kitebus(settings, "ctl", "token", stdin=b"day-2\n")
        assert code == 0, err
        assert token_file.read_text() == "day-2\n"
        async with asyncio.timeout(5):  # within seconds, not the 60 s auth retry
            while not all(c.state == "live" for c in publisher.connections):
                await asyncio.sleep(0.05)
        await eventually(lambda: at_kite() == wanted)  # every token, every mode, no restart
        assert all(c.auth_failed_at == 0 for c in publisher.connections)

        # The token never reaches Redis or the log.
        for key in await rds.keys("kite:*"):
            if await rds.type(key) == b"hash":
                assert b"day-2" not in b"".join(v for kv in (await rds.hgetall(key)).items() for v in kv)
        server_side = ("websockets.server", "kitebus.simulator")  # the simulator may log its own
        ours = [r.getMessage() for r in caplog.records if not r.name.startswith(server_side)]
        assert ours and not [message for message in ours if "day-2" in message]
    finally:
        await publisher.stop()


async def test_a_bad_token_file_is_reported_and_the_last_good_token_stays(simulator, settings, tmp_path):
    token_file = tmp_path / "access_token"
    token_file.write_text("simulator\n")
    settings = settings.model_copy(update={"kite_access_token": None, "kite_access_token_file": token_file})
    publisher = Publisher(settings, FAST)
    await publisher.start()
    try:
        await eventually(lambda: all(c.state == "live" for c in publisher.connections))
        token_file.write_text("one\ntwo\n")
        await eventually(lambda: publisher.access_token.error)
        assert "more than one line" in publisher.access_token.error
        assert publisher.access_token.access_token == "simulator"
        _, out, _ = await _kitebus(settings, "status", "--sample", "0.1")
        assert "ACCESS TOKEN FILE" in out and "the last good token stays in use" in out
        simulator.drop()  # a reconnect still uses the last good token
        await eventually(lambda: all(c.state == "live" and c.reconnects for c in publisher.connections))
        token_file.unlink()
        await eventually(lambda: "missing" in publisher.access_token.error)
    finally:
        await publisher.stop()


async def test_ctl_token_refuses_bad_input_and_the_command_line(settings, tmp_path) -> None:
    token_file = tmp_path / "access_token"
    token_file.write_text("good\n")
    settings = settings.model_copy(update={"kite_access_token_file": token_file})
    for stdin, why in ((b"", "empty"), (b"one\ntwo\n", "more than one line")):
        code, _, err = await _kitebus(settings, "ctl", "token", stdin=stdin)
        assert code == 2 and why in err
    code, _, err = await _kitebus(settings, "ctl", "token", "secret-on-the-command-line")
    assert code == 2 and "standard input" in err and "secret-on-the-command-line" not in err
    assert token_file.read_text() == "good\n"  # nothing changed
