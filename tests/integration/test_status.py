"""``kitebus status`` gives an answer in every state of every key it reads: missing, of
another version's format, half written, of another type, garbage. The image's
healthcheck runs it, so a traceback is a container marked unhealthy for no reason."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis
from rich.console import Console

from config import Keys, Settings
from consumers.status import read_status, render_status
from publisher import app
from tests.integration.conftest import eventually
from tests.integration.test_cli import kitebus

Setup = Callable[[redis.Redis], Awaitable[Any]]
NOW = "<now>"  # written as the time of the write
RUNNING = {
    "pid": "4242", "started_at": NOW, "heartbeat_at": NOW, "heartbeat_interval": "1", "state": "running",
    "tokens": "2", "capacity": "9000", "connections": "1", "published": "10", "leader_since": NOW,
}  # fmt: skip
CONN = {"state": "live", "account": "default", "tokens": "2", "ticks": "5", "last_message_at": NOW}


def running(**changes: str) -> Setup:
    """A running publisher's status and one connection, with these fields changed."""

    async def setup(rds: redis.Redis) -> None:
        await rds.hset("kite:status", mapping=_now({**RUNNING, **changes}))
        await rds.hset("kite:conn:0", mapping=_now(CONN))
        await rds.set("kite:leader", "7:host:4242")

    return setup


def then(*steps: Setup) -> Setup:
    async def setup(rds: redis.Redis) -> None:
        for step in steps:
            await step(rds)

    return setup


def write(method: str, key: str, *args: Any, mapping: dict | None = None) -> Setup:
    def setup(rds: redis.Redis) -> Any:  # the times are the write's, not the import's
        extra = {} if mapping is None else {"mapping": _now(mapping)}
        return getattr(rds, method)(key, *(_now(a) for a in args), **extra)

    return setup


def _now(value: Any) -> Any:
    """``value`` with NOW as the time of the write."""
    if isinstance(value, dict):
        return {k: _now(v) for k, v in value.items()}
    return f"{time.time():.3f}" if value == NOW else value


# (id, what Redis holds, what the JSON answer says (dotted path -> value), text shown)
STATES: list[tuple[str, Setup, dict[str, Any], str]] = [
    ("nothing at all", then(), {"publisher.state": "absent", "publisher.alive": False}, "NOT ALIVE"),
    ("running", running(), {"publisher.alive": True, "leadership.fence": 7}, "leader host:4242 (fence 7)"),
    # {ns}:leader
    ("leader released by a clean stop",
     then(running(state="stopped"), write("set", "kite:leader", "released")),
     {"leadership.leader": None, "leadership.released": True, "publisher.alive": False},
     "leader none (released by a clean stop)"),
    ("leader missing", then(running(), write("delete", "kite:leader")),
     {"leadership.leader": None, "leadership.released": False, "publisher.alive": True}, "alive"),
    ("leader without a fence", then(running(), write("set", "kite:leader", "host:4242")),
     {"leadership.leader": "host:4242", "leadership.fence": None}, "is not <fence>:<host>:<pid>"),
    ("leader garbage", then(running(), write("set", "kite:leader", "x:[/]:y")),
     {"leadership.leader": "x:[/]:y", "leadership.fence": None}, "leader x:[/]:y;"),
    ("leader with a fence of non-ASCII digits", then(running(), write("set", "kite:leader", "²:host:1")),
     {"leadership.leader": "²:host:1", "leadership.fence": None}, "is not <fence>:<host>:<pid>"),
    ("leader not UTF-8", then(running(), write("set", "kite:leader", b"\xff\xfe")),
     {"leadership.fence": None}, "is not <fence>"),
    ("leader a hash", then(running(), write("delete", "kite:leader"), write("hset", "kite:leader", "a", "b")),
     {"leadership.leader": None}, "UNREADABLE: kite:leader: WRONGTYPE"),
    # {ns}:status
    ("status missing, a connection left", write("hset", "kite:conn:0", mapping=CONN),
     {"publisher.state": "absent", "connections": []}, "NOT ALIVE"),
    ("status half written: state only", write("hset", "kite:status", "state", "running"),
     {"publisher.old_heartbeat": True, "publisher.pid": None}, "OLD HEARTBEAT"),
    ("status of an older version", write("hset", "kite:status", mapping={k: RUNNING[k] for k in (
        "pid", "started_at", "heartbeat_at", "tokens", "capacity", "state", "connections")}),
     {"publisher.alive": True, "publisher.degraded_reason": "", "leadership.since_age": None}, "alive"),
    ("status numbers garbage", running(
        heartbeat_at="soon", pid="x", capacity="", tokens="1.5", published="inf", heartbeat_interval="nan",
        leader_since="[/]", task_restarts="-", connections="one"),
     {"publisher.alive": False, "publisher.pid": None, "totals.tokens": 1, "publisher.published": 0,
      "connections": []}, "kite:status heartbeat_at='soon' is not a number"),
    ("status says a billion connections", running(connections="1000000000"),
     {"publisher.alive": True}, "64 at most are read"),
    ("status says -1 connections", running(connections="-1"), {"connections": []}, "64 at most are read"),
    ("status a string", write("set", "kite:status", "running"),
     {"publisher.state": "absent"}, "UNREADABLE: kite:status: WRONGTYPE"),
    ("status state is markup", running(state="[/bold]"), {"publisher.state": "[/bold]"}, "[/bold] NOT ALIVE"),
    # {ns}:conn:{i}
    ("connection hash missing (half written on a cluster)", running(connections="3"),
     {"connections.1.state": "?", "connections.2.ticks": 0}, "?"),
    ("connection numbers garbage", then(running(), write("hset", "kite:conn:0", mapping={
        "ticks": "many", "last_message_at": "x", "auth_failed_at": "nan", "account": "[/]"})),
     {"connections.0.ticks": 0, "connections.0.last_message_age": None,
      "connections.0.auth_failed_for": None},
     "kite:conn:0 ticks='many' is not a number"),
    ("connection a list", then(running(), write("delete", "kite:conn:0"), write("rpush", "kite:conn:0", "x")),
     {"connections.0.state": "?"}, "UNREADABLE: kite:conn:0: WRONGTYPE"),
    # {ns}:standby
    ("standby half written", then(running(), write("hset", "kite:standby", "heartbeat_at", NOW)),
     {"leadership.standby": "?:?"}, "standby ?:?"),
    ("standby a string", then(running(), write("set", "kite:standby", "x")),
     {"leadership.standby": None}, "UNREADABLE: kite:standby: WRONGTYPE"),
    # {ns}:clients and {ns}:claims:{client}
    ("clients with markup and bytes", then(running(), write("sadd", "kite:clients", "[/]", b"\xff"),
                                           write("hset", b"kite:claims:\xff", "1", "ltp")),
     {"clients.[/]": 0, "clients.\ufffd": 1}, "clients: [/] (0), \ufffd (1)"),
    ("claims a string",
     then(running(), write("sadd", "kite:clients", "s1"), write("set", "kite:claims:s1", "x")),
     {"clients.s1": 0}, "UNREADABLE: kite:claims:s1: WRONGTYPE"),
    ("clients a hash", then(running(), write("hset", "kite:clients", "a", "b")),
     {"clients": {}}, "UNREADABLE: kite:clients: WRONGTYPE"),
]  # fmt: skip


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


@pytest.mark.parametrize(("setup", "answer", "shown"), [s[1:] for s in STATES], ids=[s[0] for s in STATES])
async def test_status_answers_in_every_state(rds, keys, setup: Setup, answer: dict[str, Any], shown: str):
    await setup(rds)
    data = await read_status(rds, keys, sample=0)
    json.dumps(data, allow_nan=False)  # --json prints strict JSON
    for path, value in answer.items():
        assert _at(data, path) == value, path
    out = io.StringIO()
    render_status(data, Console(file=out, width=200))
    assert shown in out.getvalue()


async def test_status_just_after_a_clean_stop(settings: Settings, rds, keys: Keys) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(settings, stop))

    async def serving() -> bool:
        return await rds.hget(keys.status, "state") == b"running"

    await eventually(serving, timeout=15)
    stop.set()
    await asyncio.wait_for(task, 15)
    assert await rds.get(keys.leader) == b"released"  # for the lease's ttl (3 s)
    data = await read_status(rds, keys, sample=0)
    assert await rds.get(keys.leader) == b"released"  # it was read in that window
    assert data["leadership"]["released"] and data["publisher"]["state"] == "stopped"
    render_status(data, Console(file=io.StringIO()))


@pytest.mark.parametrize("leader", ["released", "garbage", "1:"])
async def test_the_healthcheck_command_answers_for_any_leader(redis_url, rds, keys, leader: str) -> None:
    await running(state="stopped")(rds)
    await rds.set(keys.leader, leader, px=60_000)
    code, out, err = await kitebus(redis_url, "status", "--json", "--sample", "0")
    assert (code, err) == (1, "")  # not alive, said without a traceback
    assert json.loads(out)["publisher"]["state"] == "stopped"
    code, out, err = await kitebus(redis_url, "status", "--sample", "0")
    assert (code, err) == (1, "") and "NOT ALIVE" in out
