"""The ``kitebus`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from config import Settings, SettingsError, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _not_yet(name: str) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        print(f"kitebus {name}: not yet available", file=sys.stderr)
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitebus",
        description="One publisher for Kite's ticker connections, fanned out over Redis.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    publish = commands.add_parser("publish", help="run the publisher until SIGINT/SIGTERM")
    publish.set_defaults(handler=_not_yet("publish"))

    simulate = commands.add_parser("simulate", help="run a local Kite-protocol ticker server")
    simulate.set_defaults(handler=_not_yet("simulate"))

    demo = commands.add_parser(
        "demo", help="the whole system on this machine, live ticks on screen"
    )
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
        settings = load_settings()
        return args.handler(args, settings)
    except SettingsError as exc:
        print(f"kitebus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
