"""Read the publisher's health from Redis and show it (``kitebus status``, the demo).

Every key is read leniently: missing, written by another version, half written (on a
cluster the hashes are separate writes) or of another type, it still gives an answer.
What could not be read is listed in ``unreadable``, never raised: the image's
healthcheck runs this."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.exceptions import ResponseError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from config import Keys
from config.keys import SERVING
from rediswire import bus

STALE_AFTER = 5.0  # seconds without a publisher heartbeat (at least; 3 heartbeat intervals if longer)
HEARTBEATS_MISSED = 3
MAX_CONNECTIONS = 64  # hashes read at most, whatever {ns}:status says (3 per account)
RELEASED = "released"  # {ns}:leader for a moment after a clean stop (publisher/lease.py)

T = TypeVar("T")


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in mapping.items()}


class _Notes:
    """What could not be read, each said once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    async def read(self, key: str, call: Awaitable[T], default: T) -> T:
        try:
            return await call
        except ResponseError as exc:  # WRONGTYPE (something else wrote the key), NOPERM
            self.add(f"{key}: {exc}")
            return default


class _Hash:
    """One hash's fields; a value that is not a number counts as missing and is noted."""

    def __init__(self, key: str, fields: dict[str, str], notes: _Notes) -> None:
        self.key, self.fields, self._notes = key, fields, notes

    def text(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)

    def number(self, name: str) -> float | None:
        """A finite number, or None (missing, empty, or not a number)."""
        raw = self.fields.get(name, "")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return value
        if raw.strip():
            self._notes.add(f"{self.key} {name}={raw[:40]!r} is not a number")
        return None

    def count(self, name: str) -> int:
        value = self.number(name)
        return int(value) if value is not None else 0


async def _hash(client: redis.Redis, key: str, notes: _Notes) -> _Hash:
    return _Hash(key, _decode(await notes.read(key, client.hgetall(key), {})), notes)


async def _snapshot(client: redis.Redis, keys: Keys, notes: _Notes) -> tuple[_Hash, list[_Hash]]:
    status = await _hash(client, keys.status, notes)
    count = status.count("connections")
    if count > MAX_CONNECTIONS or count < 0:
        notes.add(f"{keys.status} connections={count}: {MAX_CONNECTIONS} at most are read")
        count = max(0, min(count, MAX_CONNECTIONS))
    conns = [await _hash(client, keys.conn(i), notes) for i in range(count)]
    return status, conns


def parse_leader(raw: str | None) -> tuple[str | None, int | None]:
    """(holder, fence) of a ``{ns}:leader`` value ``<fence>:<host>:<pid>``: (None, None) when
    there is none or it says ``released``; a value of another format is its own holder."""
    if raw is None or raw == RELEASED:
        return None, None
    fence, colon, identity = raw.partition(":")
    if colon and identity and fence.isascii() and fence.isdigit():  # not '²', which int() refuses
        return identity, int(fence)
    return raw, None


async def _leadership(
    client: redis.Redis, keys: Keys, status: _Hash, notes: _Notes, now: float
) -> dict[str, Any]:
    raw = await notes.read(keys.leader, client.get(keys.leader), None)
    value = None if raw is None else _text(raw)
    holder, fence = parse_leader(value)
    if holder is not None and fence is None:
        notes.add(f"{keys.leader}={value[:60]!r} is not <fence>:<host>:<pid>")
    standby = await _hash(client, keys.standby, notes)
    since = status.number("leader_since")
    present = bool(standby.fields)
    return {
        "leader": holder,
        "fence": fence,
        "released": value == RELEASED,  # a clean stop, a moment ago: a standby may take over at once
        "since_age": round(now - since, 1) if since else None,
        "standby": f"{standby.text('host', '?')}:{standby.text('pid', '?')}" if present else None,
        "standby_refusing": standby.text("refusing"),
    }


async def _clients(client: redis.Redis, keys: Keys, notes: _Notes) -> dict[str, int]:
    members = await notes.read(keys.clients, client.smembers(keys.clients), set())
    counts = {}
    for raw in sorted(members):
        key = keys.claims("").encode() + raw  # the name as stored, even if it is not UTF-8
        counts[_text(raw)] = await notes.read(_text(key), client.hlen(key), 0)
    return counts


async def read_status(client: redis.Redis, keys: Keys, sample: float = 1.0) -> dict[str, Any]:
    """Status, per-connection health with ticks/s over ``sample`` seconds, clients, and what
    could not be read."""
    _, before = await _snapshot(client, keys, _Notes())
    started = time.monotonic()
    if sample > 0:
        await asyncio.sleep(sample)
    notes = _Notes()
    status, conns = await _snapshot(client, keys, notes)
    elapsed = max(time.monotonic() - started, 1e-9)
    now = time.time()
    connections = len(conns)
    capacity = status.count("capacity")
    limit = capacity // connections if connections else 0
    rows = []
    for index, conn in enumerate(conns):
        previous = before[index].count("ticks") if index < len(before) else None
        refused_at = conn.number("auth_failed_at")
        kite_error_at = conn.number("last_kite_error_at")
        ticks, last = conn.count("ticks"), conn.number("last_message_at")
        rows.append({
            "index": index,
            "account": conn.text("account", "default"),
            "state": conn.text("state", "?"),
            "tokens": conn.count("tokens"),
            "limit": limit,
            "ticks": ticks,
            "ticks_per_s": round(max(0, ticks - (ticks if previous is None else previous)) / elapsed, 1),
            "last_message_age": round(now - last, 3) if last else None,
            "reconnects": conn.count("reconnects"),
            "last_error": conn.text("last_error"),
            "auth_failed_for": round(now - refused_at, 1) if refused_at else None,
            "kite_errors": conn.count("kite_errors"),
            "kite_messages": conn.count("kite_messages"),
            "last_kite_error": conn.text("last_kite_error"),
            "last_kite_error_age": round(now - kite_error_at, 1) if kite_error_at else None,
            "last_kite_message": conn.text("last_kite_message"),
        })  # fmt: skip
    leadership = await _leadership(client, keys, status, notes, now)
    clients = await _clients(client, keys, notes)
    heartbeat = status.number("heartbeat_at")
    age = round(now - heartbeat, 3) if heartbeat else None
    stale_after = max(STALE_AFTER, HEARTBEATS_MISSED * (status.number("heartbeat_interval") or 0))
    state = status.text("state", "absent")
    tokens = status.count("tokens")
    pid = status.number("pid")
    return {
        "namespace": keys.ns,
        "redis": await bus.describe_server(client),
        "publisher": {
            "state": state,
            "pid": int(pid) if pid is not None else None,
            "heartbeat_age": age,
            "alive": age is not None and age < stale_after and state in SERVING,
            # it says it serves, but has not said so for a while: dead, stuck, or cut off from Redis
            "old_heartbeat": state in SERVING and (age is None or age >= stale_after),
            "degraded_reason": status.text("degraded_reason"),
            "failed_reason": status.text("failed_reason"),
            "task_restarts": status.count("task_restarts"),
            "published": status.count("published"),
            "conflated": status.count("conflated"),
            "dropped": status.count("dropped"),
            "malformed": status.count("malformed"),
            "unclaimed": status.count("unclaimed"),
            "backpressure": status.text("backpressure") == "1",
            "access_token_error": status.text("access_token_error"),
            "instruments": status.count("instruments"),
            "instruments_error": status.text("instruments_error"),
            "orders": {
                name: status.count(f"order_{name}")
                for name in ("updates", "duplicates", "malformed", "given_up", "buffered")
            },
        },
        "connections": rows,
        "totals": {"tokens": tokens, "capacity": capacity, "remaining": capacity - tokens},
        "clients": clients,
        "leadership": leadership,
        "unreadable": notes.lines,
    }


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def connections_table(data: dict[str, Any]) -> Table:
    """Per-connection health as a table."""
    table = Table(title="connections", title_justify="left", expand=False)
    for column in ("conn", "state", "tokens", "ticks/s", "last msg", "reconnects", "last error"):
        table.add_column(column, justify="left" if column in ("state", "last error") else "right")
    several = len({row.get("account") for row in data["connections"]}) > 1
    for row in data["connections"]:
        state = row["state"]
        style = "green" if state == "live" else "red" if state in ("auth_failed", "backoff") else "yellow"
        table.add_row(
            Text(f"{row['index']} {row['account']}" if several else str(row["index"])),
            Text(state, style=style), f"{row['tokens']}/{row['limit']}",
            f"{row['ticks_per_s']:.1f}",
            _age(row["last_message_age"]), str(row["reconnects"]), Text(row["last_error"]),
        )  # fmt: skip
    return table


def render_status(data: dict[str, Any], console: Console) -> None:
    """The whole status, for a terminal (or plain text when not one)."""
    pub, totals = data["publisher"], data["totals"]
    if pub["old_heartbeat"]:
        age = _age(pub["heartbeat_age"])
        health = f"[bold red]OLD HEARTBEAT ({age}): that state is its last word, it may be dead or stuck[/]"
    else:
        health = "[green]alive[/]" if pub["alive"] else "[red]NOT ALIVE[/]"
    console.print(
        f"publisher {escape('[' + data['namespace'] + ']')}: {escape(pub['state'])} {health}, "
        f"heartbeat {_age(pub['heartbeat_age'])} ago, "
        f"pid {pub['pid'] or '-'}; published {pub['published']:,}, conflated {pub['conflated']:,}, "
        f"dropped {pub['dropped']:,}, malformed {pub['malformed']:,}, unclaimed {pub['unclaimed']:,}"
        + (" [yellow]waiting for Redis (backpressure)[/]" if pub["backpressure"] else ""),
        soft_wrap=True,  # one line for scripts and pipes, whatever the console's width
    )
    if pub["state"] == "degraded" and pub["degraded_reason"]:
        console.print(f"[bold yellow]DEGRADED:[/] {escape(pub['degraded_reason'])}", soft_wrap=True)
    if pub["state"] == "failed" and pub["failed_reason"]:
        console.print(f"[bold red]FAILED (exited 1):[/] {escape(pub['failed_reason'])}", soft_wrap=True)
    if pub["task_restarts"]:
        console.print(f"tasks restarted after a crash: {pub['task_restarts']}", soft_wrap=True)
    refused = [row for row in data["connections"] if row.get("auth_failed_for") is not None]
    if refused:
        longest = max(row["auth_failed_for"] for row in refused)
        names = ",".join(str(row["index"]) for row in refused)
        console.print(
            f"[bold red]ACCESS TOKEN REFUSED by Kite for {_age(longest)} on connection(s) {names}:[/] "
            "write the new one with `kitebus ctl token` (it is picked up without a restart)",
            soft_wrap=True,
        )
    if pub["access_token_error"]:
        problem = escape(pub["access_token_error"])
        console.print(
            f"[bold red]ACCESS TOKEN FILE: {problem}[/]; the last good token stays in use", soft_wrap=True
        )
    if pub["instruments_error"]:
        problem = escape(pub["instruments_error"])
        console.print(
            f"[bold red]INSTRUMENTS: {problem}[/]; the last good dump stays in use",
            soft_wrap=True,
        )
    if data.get("redis"):
        console.print(f"redis: {escape(data['redis'])}", soft_wrap=True)
    lead = data["leadership"]
    if lead["leader"] or lead["standby"] or lead["released"]:
        since = f" for {_age(lead['since_age'])}" if lead["since_age"] is not None else ""
        term = f" (fence {lead['fence']}){since}" if lead["fence"] is not None else ""
        who = lead["leader"] or ("none (released by a clean stop)" if lead["released"] else "none")
        line = f"leader {who}{term}; standby {lead['standby'] or 'none'}"
        console.print(escape(line), soft_wrap=True)
        if lead["standby_refusing"]:
            refusing = escape(lead["standby_refusing"])
            console.print(f"[bold red]STANDBY WILL NOT TAKE OVER:[/] {refusing}", soft_wrap=True)
    console.print(connections_table(data))
    _render_kite_texts(data, console)
    console.print(f"tokens {totals['tokens']:,} of {totals['capacity']:,} ({totals['remaining']:,} free)")
    clients = data["clients"]
    if clients:
        names = ", ".join(f"{name} ({count})" for name, count in clients.items())
        console.print(Text("clients: " + names), soft_wrap=True)
    else:
        console.print("clients: none")
    for line in data.get("unreadable", []):
        console.print(Text(f"UNREADABLE: {line}", style="yellow"), soft_wrap=True)


def _render_kite_texts(data: dict[str, Any], console: Console) -> None:
    """Order updates written, and each connection's Kite error and message texts."""
    orders = data["publisher"]["orders"]
    line = (
        f"order updates: {orders['updates']:,} written, {orders['duplicates']:,} copies from other sockets "
        f"dropped, {orders['malformed']:,} malformed, {orders['buffered']:,} waiting"
    )
    if orders["given_up"]:
        line += f", [bold red]{orders['given_up']:,} GIVEN UP[/] (reconcile with Kite's orders)"
    console.print(line, soft_wrap=True)
    for row in data["connections"]:
        if row["kite_errors"] or row["kite_messages"]:
            last = ""
            if row["last_kite_error"]:
                last = f"; last {_age(row['last_kite_error_age'])} ago: {escape(row['last_kite_error'])}"
            console.print(
                f"kite texts on connection {row['index']}: {row['kite_errors']} error(s), "
                f"{row['kite_messages']} message(s){last}",
                soft_wrap=True,
            )
