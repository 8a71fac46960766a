"""The ``kitebus`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config import Keys, Settings, SettingsError, load_settings
from config.logs import configure_logging
from publisher.memory import tune_memory
from rediswire.tasks import run_until, run_until_signal, wait_for_stop_signal
from simulator.server import DEFAULT_ACCESS_TOKEN, DEFAULT_API_KEY

if TYPE_CHECKING:
    from consumers.control import ClientInfo, ControlClient, ControlResult


def _redis(settings: Settings) -> Any:
    from rediswire import bus

    return bus.connect(settings.redis_url, settings.redis_cluster, socket_connect_timeout=5)


def _ctl(args: argparse.Namespace) -> int:
    from consumers.instruments import split_items

    settings = load_settings()
    if args.op == "token":
        return _write_access_token(settings, args)
    if args.op in ("rebalance", "release", "clients"):
        return _ctl_on_held(settings, args)
    if not args.tokens:
        print(f"kitebus ctl {args.op}: name at least one instrument token", file=sys.stderr)
        return 2
    if args.op == "mode" and args.mode is None:
        print("kitebus ctl mode: --mode is required", file=sys.stderr)
        return 2
    tokens = split_items(",".join(args.tokens))  # symbols are the publisher's to resolve

    def describe(result: ControlResult) -> str:
        lines = [
            f"{'ok' if result.ok else 'REJECTED'}: {result.op} client={result.client} "
            f"applied={len(result.applied)} rejected={len(result.rejected)}"
        ]
        if result.rejected:
            lines.append(f"rejected: {','.join(map(str, result.rejected))}")
        if result.error:
            lines.append(f"error: {result.error}")
        return "\n".join(lines)

    return _send(settings, args, describe, lambda control: control.request(
        args.op, tokens, mode=args.mode, client=args.client or "ops", ttl=args.ttl,
        timeout=10.0 if args.timeout is None else args.timeout,
    ))  # fmt: skip


def _ctl_on_held(settings: Settings, args: argparse.Namespace) -> int:
    """``rebalance`` (even out the connections, wait until every move ended), ``release
    --client C`` (every claim of C, a strategy that vanished) and ``clients`` (who holds
    claims, idle how long): ops that act on what is held."""
    if args.tokens or args.mode or args.ttl:
        print(f"kitebus ctl {args.op}: no tokens, --mode or --ttl (it acts on what is held)", file=sys.stderr)
        return 2
    if args.op == "clients":
        return _send(settings, args, None, lambda control: control.clients())
    if args.op == "release":
        if not args.client:
            print("kitebus ctl release: name the client whose claims go, with --client", file=sys.stderr)
            return 2
        return _send(
            settings, args,
            lambda result: f"ok: release client={result.client} released={len(result.applied)}",
            lambda control: control.release(args.client, 10.0 if args.timeout is None else args.timeout),
        )  # fmt: skip
    timeout = 30.0 if args.timeout is None else args.timeout  # the moves wait for first ticks
    return _send(
        settings, args,
        lambda result: f"ok: rebalance moved {len(result.applied)} token(s); "
        f"tokens per connection now {','.join(map(str, result.loads))}",
        lambda control: control.rebalance(args.client or "ops", timeout),
    )  # fmt: skip


def _send(
    settings: Settings,
    args: argparse.Namespace,
    describe: Callable[[ControlResult], str] | None,
    call: Callable[[ControlClient], Awaitable[Any]],
) -> int:
    """Run one ControlClient call and print its answer: exit 0 ok, 1 rejected, 3 no answer
    in time. ``describe`` None: the answer is the client list."""
    from consumers.control import ControlClient, ControlTimeout, SubscriptionRejected

    async def run() -> int:
        client = _redis(settings)
        try:  # an ops command's claims stay until released: no heartbeat, no session
            answer = await call(ControlClient(client, settings.namespace, session=False))
        except SubscriptionRejected as exc:
            print(f"REJECTED: {args.op}: {exc}", file=sys.stderr)
            return 1
        except ControlTimeout as exc:
            print(f"kitebus ctl: {exc}", file=sys.stderr)
            return 3
        finally:
            await client.aclose()
        if describe is None:
            _print_clients(answer, args.json)
            return 0
        print(json.dumps(dataclasses.asdict(answer)) if args.json else describe(answer))
        return 0 if answer.ok else 1

    return asyncio.run(run())


def _print_clients(clients: dict[str, ClientInfo], as_json: bool) -> None:
    now = time.time()
    if as_json:
        rows = {
            name: {
                "claims": c.claims, "last_request_at": c.last_request_at, "kind": c.kind,
                "timeout": c.timeout or None, "heartbeat_at": c.heartbeat_at or None,
                "heartbeat_age": round(now - c.heartbeat_at, 3) if c.heartbeat_at else None,
            }
            for name, c in clients.items()
        }  # fmt: skip
        print(json.dumps(rows))
        return
    for name, c in clients.items():
        if c.kind == "standing":
            kind = "standing (until released)"
        elif c.heartbeat_at:
            late = "  SILENT" if now - c.heartbeat_at > c.timeout else ""
            kind = f"session, heartbeat {now - c.heartbeat_at:,.1f}s ago (timeout {c.timeout:g}s){late}"
        else:
            kind = f"session, no heartbeat (timeout {c.timeout:g}s)  SILENT"
        seen = c.last_request_at
        idle = f"last request {now - seen:,.0f}s ago" if seen else "last request unknown"
        print(f"{name}\t{c.claims} claim(s)\t{kind}\t{idle}")
    if not clients:
        print("no client holds a claim")


def _write_access_token(settings: Settings, args: argparse.Namespace) -> int:
    """``kitebus ctl token``: the access token from standard input into KITE_ACCESS_TOKEN_FILE."""
    from publisher.access_token import AccessTokenError, write_access_token_file

    path = Path(args.file).expanduser().absolute() if args.file else settings.kite_access_token_file
    if path is None:
        print("kitebus ctl token: set KITE_ACCESS_TOKEN_FILE (or give --file)", file=sys.stderr)
        return 2
    if args.tokens:
        print("kitebus ctl token: the token comes from standard input, never the command line "
              "(where ps would show it)", file=sys.stderr)  # fmt: skip
        return 2
    if sys.stdin.isatty():
        print("kitebus ctl token: paste the access token, then Enter and Ctrl-D", file=sys.stderr)
    try:
        write_access_token_file(path, sys.stdin.read())
    except AccessTokenError as exc:
        print(f"kitebus ctl token: not written: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kitebus ctl token: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"access token written to {path}; a running publisher picks it up by itself")
    return 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from consumers.status import read_status, render_status

    settings = load_settings()

    async def run() -> dict[str, Any]:
        client = _redis(settings)
        try:
            return await read_status(client, Keys(settings.namespace), sample=args.sample)
        finally:
            await client.aclose()

    data = asyncio.run(run())
    if args.json:
        print(json.dumps(data))
    else:
        render_status(data, Console())
    return 0 if data["publisher"]["alive"] else 1


def _tail(args: argparse.Namespace) -> int:
    from consumers.display import format_order, format_status, format_tick
    from consumers.instruments import UnknownInstrument, split_items
    from consumers.orders import OrderReader
    from consumers.subscriber import StreamStatus, TickSubscriber

    settings = load_settings()
    tokens = split_items(",".join(args.tokens))
    if not tokens and not args.orders:
        print("kitebus tail: name at least one instrument token, or give --orders", file=sys.stderr)
        return 2
    printed = 0
    enough = asyncio.Event()  # --count lines printed, ticks and order updates together

    def emit(line: str) -> None:
        nonlocal printed
        print(line, flush=True)
        printed += 1
        if printed == args.count:
            enough.set()

    async def orders(reader: OrderReader) -> None:
        async for update in reader:
            emit(json.dumps(dataclasses.asdict(update)) if args.json else format_order(update))

    async def run() -> None:
        symbols: dict[int, str] = {}

        def show_status(event: StreamStatus) -> None:
            if args.json:
                fields = {"stream_status": event.status, "tokens": event.tokens, "reason": event.reason}
                line = json.dumps(fields)
            else:
                line = format_status(event.status, event.tokens, event.reason, symbols)
            print(line, flush=True)

        async def ticks(sub: TickSubscriber) -> None:
            async for tick in sub:
                symbol = symbols.get(tick["instrument_token"])
                emit(json.dumps(tick) if args.json else format_tick(tick, symbol))

        async with TickSubscriber(
            settings, client=f"tail-{os.getpid()}", snapshot=not args.no_snapshot, on_status=show_status,
            conflate_ms=args.conflate_ms,
        ) as sub:  # fmt: skip
            work = []
            if args.orders:  # reading from now (or --since) before any tick is awaited
                reader = sub.order_updates(args.since, account=args.account)
                await reader.start()
                work.append(orders(reader))
            if tokens:
                if args.subscribe:
                    await sub.subscribe(tokens, mode=args.subscribe)
                else:
                    await sub.listen(tokens)
                symbols.update(await sub.symbols(sub.listened))
                work.append(ticks(sub))
            await run_until(asyncio.gather(*work), enough)

    try:
        run_until_signal(lambda stop: run_until(run(), stop))
    except (UnknownInstrument, ValueError) as exc:
        print(f"kitebus tail: {exc}", file=sys.stderr)
        return 2
    return 0


def _bars(args: argparse.Namespace) -> int:
    from consumers.instruments import UnknownInstrument, split_items
    from kitebus.bars_service import BarsOptions, BarsService

    settings = load_settings()
    configure_logging("WARNING")
    try:
        options = BarsOptions(
            intervals=args.interval or ["1m"], tokens=split_items(",".join(args.tokens)),
            keep=args.keep, grace=args.grace,
        )  # fmt: skip
        service = BarsService(settings, options)
        run_until_signal(service.run)
    except (UnknownInstrument, ValueError) as exc:
        print(f"kitebus bars: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # the pub/sub socket's own error (redis-py's are caught in main)
        print(f"kitebus bars: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    return 0


def _replay(args: argparse.Namespace) -> int:
    """``kitebus replay DIR``: exit 0 played to the end (or stopped by a signal), 1 ticks lost
    with a cut connection, 2 bad input."""
    from kitebus.replay import EmptyWindow, NamespaceTaken, Replay, load, parse_clock, parse_speed

    try:
        speed = parse_speed(args.speed)
        since = parse_clock(args.since) if args.since else None
        until = parse_clock(args.until) if args.until else None
        ticks, holes = load(Path(args.dir), since, until)
    except (EmptyWindow, ValueError) as exc:
        print(f"kitebus replay: {exc}", file=sys.stderr)
        return 2
    settings = load_settings().model_copy(update={"namespace": args.namespace})
    configure_logging("INFO")
    replay = Replay(settings, ticks, holes, speed=speed, subscribe=args.subscribe, exit_at_end=args.exit)
    tokens = len(replay.report.tokens)
    print(f"kitebus replay: {len(ticks)} ticks of {tokens} tokens into namespace {args.namespace!r}"
          + ("" if args.subscribe else "; waiting for a strategy to claim one"), file=sys.stderr)  # fmt: skip
    try:
        tune_memory()  # the process runs a publisher
        run_until_signal(replay.run)
    except NamespaceTaken as exc:
        print(f"kitebus replay: {exc}", file=sys.stderr)
        return 2
    report = replay.report
    if not replay.done.is_set():
        print("kitebus replay: stopped before the end", file=sys.stderr)
    if report.unarrived:
        print(f"kitebus replay: {report.unarrived} ticks sent were lost with a cut connection",
              file=sys.stderr)
    print(f"kitebus replay: {report.sent} ticks sent, {report.skipped} of unclaimed tokens skipped, "
          f"{report.given_up} given up by the publisher, {report.holes} stale periods, "
          f"{report.rate:,.0f} ticks/s", file=sys.stderr)  # fmt: skip
    return 1 if report.unarrived else 0


def _record(args: argparse.Namespace) -> int:
    """``kitebus record DIR [TOKENS…]``: exit 0 stopped by a signal, 2 bad input, 1 a write failed."""
    from consumers.instruments import UnknownInstrument, split_items
    from consumers.recorder import DiskFull, ParquetSink, Recorder, check_writable
    from consumers.subscriber import TickSubscriber

    settings = load_settings()
    configure_logging("INFO")
    root = Path(args.dir)
    try:
        check_writable(root)
    except OSError as exc:
        print(f"kitebus record: {root} is not writable: {exc.strerror or exc}", file=sys.stderr)
        return 2
    items = split_items(",".join(args.tokens))
    sink = ParquetSink(root, roll_seconds=args.roll)
    recorder = Recorder(sink, flush_seconds=args.flush)

    async def run(stop: asyncio.Event) -> None:
        sink.compact()  # windows a recorder before this one left in parts
        async with TickSubscriber(
            settings, client=f"record-{os.getpid()}", snapshot=False, on_status=recorder.on_status,
            max_unread=100_000,
        ) as sub:  # fmt: skip
            tokens = await sub.resolve(items) if items else None
            if tokens and args.subscribe:
                await sub.subscribe(tokens, mode=args.subscribe)
            await recorder.run(sub, tokens, stop)

    try:
        run_until_signal(run)
    except (UnknownInstrument, ValueError) as exc:
        print(f"kitebus record: {exc}", file=sys.stderr)
        return 2
    except DiskFull as exc:
        logging.getLogger("kitebus.recorder").error("recording stopped: %s", exc)
        print(f"kitebus record: STOPPED: {exc}; the files already written are kept", file=sys.stderr)
        return 1
    stats = sink.stats
    print(f"kitebus record: {stats.ticks} ticks, {stats.events} events in {root}", file=sys.stderr)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from publisher import app

    return app.main()


def _demo(args: argparse.Namespace) -> int:
    from kitebus.demo import run_demo

    settings = load_settings()
    configure_logging("WARNING")  # the screen is the demo's output

    tune_memory()  # the process runs a publisher
    run_until_signal(lambda stop: run_demo(settings, stop, args.duration))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simulator.server import TickerServer

    configure_logging("INFO")

    async def run() -> None:
        server = TickerServer(
            args.host, args.port, api_key=args.api_key, access_token=args.access_token,
            rate=args.rate, max_rate=args.max_rate, seed=args.seed, order_rate=args.orders,
        )  # fmt: skip
        async with server:
            print(f"simulator: KITE_WS_URL={server.url}", file=sys.stderr)
            http = f"http://{args.host}:{server.port}/orders"
            print(f"simulator: orders: curl '{http}/place?tradingsymbol=INFY&quantity=10&price=1500'; "
                  f"then {http}/fill?order_id=…&quantity=4, /cancel, /reject, /modify; {http} lists them",
                  file=sys.stderr)  # fmt: skip
            await wait_for_stop_signal()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitebus",
        description="One publisher for Kite's ticker connections, fanned out over Redis.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    publish = commands.add_parser("publish", help="run the publisher until SIGINT/SIGTERM")
    publish.set_defaults(handler=_publish)

    simulate = commands.add_parser("simulate", help="run a local Kite-protocol ticker server")
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on")
    simulate.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    simulate.add_argument("--rate", type=float, default=1.0, help="ticks/s per instrument")
    simulate.add_argument("--max-rate", type=float, default=20_000.0, help="ticks/s per connection")
    simulate.add_argument("--seed", type=int, default=0, help="random seed of the market")
    simulate.add_argument("--api-key", default=DEFAULT_API_KEY, help="api_key to accept")
    simulate.add_argument("--access-token", default=DEFAULT_ACCESS_TOKEN, help="token to accept")
    simulate.add_argument(
        "--orders", type=float, default=0.0, metavar="RATE",
        help="random order updates per second (placed, filled in parts, cancelled, rejected); "
        "0: only those made with GET /orders/...",
    )  # fmt: skip
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="the whole system on this machine, live ticks on screen")
    demo.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    demo.set_defaults(handler=_demo)

    ctl = commands.add_parser("ctl", help="send a subscription request and wait for its result")
    ctl.add_argument(
        "op", choices=["subscribe", "unsubscribe", "mode", "set", "rebalance", "release", "clients", "token"],
        help="set: the client's claims become exactly TOKEN...; "
        "rebalance: even out the connections (make-before-break) and wait until done; "
        "release: drop every claim of --client; clients: who holds claims, of which kind, "
        "heartbeat and last request how long ago; "
        "token: write the access token from standard input to KITE_ACCESS_TOKEN_FILE",
    )  # fmt: skip
    ctl.add_argument("tokens", nargs="*", metavar="TOKEN", help="instrument tokens or EXCHANGE:SYMBOL")
    ctl.add_argument("--file", help="with token: the file to write (default: KITE_ACCESS_TOKEN_FILE)")
    ctl.add_argument("--mode", choices=["ltp", "quote", "full"], help="quote by default for subscribe")
    ctl.add_argument("--client", help="whose claim this is (default: ops; required for release)")
    ctl.add_argument("--ttl", type=float, help="seconds after which the claim lapses by itself")
    ctl.add_argument("--timeout", type=float, help="seconds to wait for the result (10; rebalance 30)")
    ctl.add_argument("--json", action="store_true", help="print the result as JSON")
    ctl.set_defaults(handler=_ctl)

    status = commands.add_parser("status", help="connections, capacity, health, rates")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.add_argument("--sample", type=float, default=1.0, help="seconds to measure ticks/s over")
    status.set_defaults(handler=_status)

    tail = commands.add_parser("tail", help="print decoded ticks and order updates from the bus")
    tail.add_argument("tokens", nargs="*", metavar="TOKEN", help="instrument tokens or EXCHANGE:SYMBOL")
    tail.add_argument("--orders", action="store_true", help="also (or only) order updates, as they come")
    tail.add_argument("--account", help="with --orders: only this account's (default: every account's)")
    tail.add_argument(
        "--since", metavar="ID", help="with --orders: after this stream entry id (0: all the stream keeps)"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per tick")
    tail.add_argument("--no-snapshot", action="store_true", help="skip each token's latest tick")
    tail.add_argument(
        "--conflate-ms", type=float, default=0.0, metavar="MS",
        help="each token's newest tick at most every MS milliseconds",
    )  # fmt: skip
    tail.add_argument("--subscribe", choices=["ltp", "quote", "full"], help="also claim them in this mode")
    tail.add_argument("--count", type=int, default=0, help="stop after this many lines (ticks and orders)")
    tail.set_defaults(handler=_tail)

    bars = commands.add_parser("bars", help="build OHLCV bars from the bus's ticks and publish them")
    bars.add_argument("tokens", nargs="*", metavar="TOKEN", help="instrument tokens or EXCHANGE:SYMBOL "
                      "(default: every token the publisher carries, new ones as they come)")  # fmt: skip
    bars.add_argument(
        "--interval", action="append", choices=["1m", "5m", "15m", "1h", "day"],
        help="bar interval; repeat for several (default: 1m)",
    )  # fmt: skip
    bars.add_argument("--keep", type=int, default=500, help="bars kept per token and interval in Redis")
    bars.add_argument("--grace", type=float, default=2.0, help="seconds a bar waits for late ticks")
    bars.set_defaults(handler=_bars)

    record = commands.add_parser("record", help="write every tick on the bus to Parquet files under DIR")
    record.add_argument("dir", metavar="DIR", help="one directory per IST day is made under it")
    record.add_argument("tokens", nargs="*", metavar="TOKEN", help="only these (tokens or EXCHANGE:SYMBOL); "
                        "default: every token the publisher carries, followed")  # fmt: skip
    record.add_argument("--flush", type=float, default=2.0, help="seconds between flushes (the crash bound)")
    record.add_argument("--roll", type=float, default=300.0, help="seconds per compacted file")
    record.add_argument("--subscribe", choices=["ltp", "quote", "full"], help="also claim TOKENs in mode")
    record.set_defaults(handler=_record)

    replay = commands.add_parser("replay", help="play a recording back through a simulator and a publisher")
    replay.add_argument("dir", metavar="DIR", help="what kitebus record wrote")
    replay.add_argument("--speed", default="1", help="times recorded speed, or 'max' (default: 1)")
    replay.add_argument("--from", dest="since", metavar="HH:MM", help="start at this IST time of day")
    replay.add_argument("--to", dest="until", metavar="HH:MM", help="end before this IST time of day")
    replay.add_argument("--namespace", default="replay", help="the replay's own namespace (default: replay)")
    replay.add_argument("--subscribe", action="store_true",
                        help="claim every recorded token in its recorded mode and start at once "
                        "(default: wait for a strategy's first claim)")  # fmt: skip
    replay.add_argument("--exit", action="store_true",
                        help="stop once the last tick is published (default: serve on)")  # fmt: skip
    replay.set_defaults(handler=_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"kitebus: {exc}", file=sys.stderr)
        return 2
    except (RedisConnectionError, RedisTimeoutError) as exc:
        print(f"kitebus: cannot reach Redis: {exc}", file=sys.stderr)  # redis-py names host:port only
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kitebus status --json | head -c 100`): end quietly. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
