"""The ``kitebus`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from config import SettingsError, load_settings
from kitebus.logs import configure_logging
from kitebus.signals import wait_for_stop_signal
from simulator.server import DEFAULT_ACCESS_TOKEN, DEFAULT_API_KEY

Handler = Callable[[argparse.Namespace], int]


def _not_yet(name: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        load_settings()
        print(f"kitebus {name}: not yet available", file=sys.stderr)
        return 2

    return handler


def _publish(args: argparse.Namespace) -> int:
    from publisher import app

    settings = load_settings()
    settings.require_credentials()
    configure_logging(settings.log_level)

    async def run() -> None:
        stop = asyncio.Event()
        waiter = asyncio.create_task(wait_for_stop_signal())
        waiter.add_done_callback(lambda _: stop.set())
        try:
            await app.run(settings, stop)
        finally:
            waiter.cancel()

    asyncio.run(run())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simulator.server import TickerServer

    configure_logging("INFO")

    async def run() -> None:
        server = TickerServer(
            args.host, args.port, api_key=args.api_key, access_token=args.access_token,
            rate=args.rate, max_rate=args.max_rate, seed=args.seed,
        )  # fmt: skip
        async with server:
            print(f"simulator: KITE_WS_URL={server.url}", file=sys.stderr)
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
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="the whole system on this machine, live ticks on screen")
    demo.set_defaults(handler=_not_yet("demo"))

    ctl = commands.add_parser("ctl", help="send a subscription request and wait for its result")
    ctl.set_defaults(handler=_not_yet("ctl"))

    status = commands.add_parser("status", help="connections, capacity, health, rates")
    status.set_defaults(handler=_not_yet("status"))

    tail = commands.add_parser("tail", help="print decoded ticks from the bus")
    tail.set_defaults(handler=_not_yet("tail"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SettingsError as exc:
        print(f"kitebus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
