"""Read the publisher's health from Redis and show it (``kitebus status``, the demo)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from config import Keys
from config.keys import SERVING
from rediswire import bus

STALE_AFTER = 5.0  # seconds without a publisher heartbeat (at least; 3 heartbeat intervals if longer)
HEARTBEATS_MISSED = 3


def _decode(mapping: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


async def _snapshot(client: redis.Redis, keys: Keys) -> tuple[dict[str, str], list[dict[str, str]]]:
    status = _decode(await client.hgetall(keys.status))
    count = int(status.get("connections", 0))
    conns = [_decode(await client.hgetall(keys.conn(i))) for i in range(count)]
    return status, conns


async def read_status(client: redis.Redis, keys: Keys, sample: float = 1.0) -> dict[str, Any]:
    """Status, per-connection health with ticks/s over ``sample`` seconds, and clients."""
    _, before = await _snapshot(client, keys)
    started = time.monotonic()
    if sample > 0:
        await asyncio.sleep(sample)
    status, conns = await _snapshot(client, keys)
    elapsed = max(time.monotonic() - started, 1e-9)
    now = time.time()
    connections = len(conns)
    capacity = int(status.get("capacity", 0))
    limit = capacity // connections if connections else 0
    rows = []
    for index, conn in enumerate(conns):
        previous = before[index] if index < len(before) else {}
        refused_at = float(conn.get("auth_failed_at") or 0)
        kite_error_at = float(conn.get("last_kite_error_at") or 0)
        ticks, last = int(conn.get("ticks", 0)), float(conn.get("last_message_at", 0) or 0)
        rows.append({
            "index": index,
            "account": conn.get("account", "default"),
            "state": conn.get("state", "?"),
            "tokens": int(conn.get("tokens", 0)),
            "limit": limit,
            "ticks": ticks,
            "ticks_per_s": round(max(0, ticks - int(previous.get("ticks", ticks))) / elapsed, 1),
            "last_message_age": round(now - last, 3) if last else None,
            "reconnects": int(conn.get("reconnects", 0)),
            "last_error": conn.get("last_error", ""),
            "auth_failed_for": round(now - refused_at, 1) if refused_at else None,
            "kite_errors": int(conn.get("kite_errors") or 0),
            "kite_messages": int(conn.get("kite_messages") or 0),
            "last_kite_error": conn.get("last_kite_error", ""),
            "last_kite_error_age": round(now - kite_error_at, 1) if kite_error_at else None,
            "last_kite_message": conn.get("last_kite_message", ""),
        })  # fmt: skip
    leader = await client.get(keys.leader)
    standby = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.standby)).items()}
    leadership = {
        "leader": leader.decode().split(":", 1)[1] if leader else None,
        "fence": int(leader.decode().split(":", 1)[0]) if leader else None,
        "since_age": round(now - float(status["leader_since"]), 1) if status.get("leader_since") else None,
        "standby": f"{standby['host']}:{standby['pid']}" if standby else None,
        "standby_refusing": standby.get("refusing", ""),
    }
    clients = {}
    for raw in sorted(await client.smembers(keys.clients)):
        clients[raw.decode()] = await client.hlen(keys.claims(raw.decode()))
    heartbeat = float(status.get("heartbeat_at", 0) or 0)
    age = round(now - heartbeat, 3) if heartbeat else None
    stale_after = max(STALE_AFTER, HEARTBEATS_MISSED * float(status.get("heartbeat_interval") or 0))
    state = status.get("state", "absent")
    tokens = int(status.get("tokens", 0))
    return {
        "namespace": keys.ns,
        "redis": await bus.describe_server(client),
        "publisher": {
            "state": state,
            "pid": int(status["pid"]) if "pid" in status else None,
            "heartbeat_age": age,
            "alive": age is not None and age < stale_after and state in SERVING,
            # it says it serves, but has not said so for a while: dead, stuck, or cut off from Redis
            "old_heartbeat": state in SERVING and (age is None or age >= stale_after),
            "degraded_reason": status.get("degraded_reason", ""),
            "failed_reason": status.get("failed_reason", ""),
            "task_restarts": int(status.get("task_restarts", 0)),
            "published": int(status.get("published", 0)),
            "conflated": int(status.get("conflated", 0)),
            "dropped": int(status.get("dropped", 0)),
            "malformed": int(status.get("malformed", 0)),
            "backpressure": status.get("backpressure") == "1",
            "access_token_error": status.get("access_token_error", ""),
            "instruments": int(status.get("instruments", 0)),
            "instruments_error": status.get("instruments_error", ""),
            "orders": {
                name: int(status.get(f"order_{name}") or 0)
                for name in ("updates", "duplicates", "malformed", "given_up", "buffered")
            },
        },
        "connections": rows,
        "totals": {"tokens": tokens, "capacity": capacity, "remaining": capacity - tokens},
        "clients": clients,
        "leadership": leadership,
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
            f"{row['index']} {row['account']}" if several else str(row["index"]),
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
        f"publisher {escape('[' + data['namespace'] + ']')}: {pub['state']} {health}, "
        f"heartbeat {_age(pub['heartbeat_age'])} ago, "
        f"pid {pub['pid'] or '-'}; published {pub['published']:,}, conflated {pub['conflated']:,}, "
        f"dropped {pub['dropped']:,}, malformed {pub['malformed']:,}"
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
    if lead["leader"] or lead["standby"]:
        since = f" for {_age(lead['since_age'])}" if lead["since_age"] is not None else ""
        term = f" (fence {lead['fence']}){since}" if lead["leader"] else ""
        line = f"leader {lead['leader'] or 'none'}{term}; standby {lead['standby'] or 'none'}"
        console.print(escape(line), soft_wrap=True)
        if lead["standby_refusing"]:
            refusing = escape(lead["standby_refusing"])
            console.print(f"[bold red]STANDBY WILL NOT TAKE OVER:[/] {refusing}", soft_wrap=True)
    console.print(connections_table(data))
    _render_kite_texts(data, console)
    console.print(f"tokens {totals['tokens']:,} of {totals['capacity']:,} ({totals['remaining']:,} free)")
    clients = data["clients"]
    if clients:
        console.print("clients: " + ", ".join(f"{name} ({count})" for name, count in clients.items()))
    else:
        console.print("clients: none")


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
