"""``edge`` — the gateway's command line.

Each verb group lives in its own module with ``register(subparsers)``; handlers import
heavy libraries lazily so ``edge check-config`` stays fast. Exit codes: 0 ok, 1 runtime
failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge import __version__
from edge.cli import (
    audit,
    certs,
    demo,
    dlq,
    healthcheck,
    lot,
    outbox,
    relay,
    run,
    simulate,
    sink,
    status,
    trace,
)

MODULES = (run, outbox, dlq, trace, audit, status, sink, lot, relay, demo, simulate, certs,
           healthcheck)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge",
        description="Plant edge gateway: OPC UA / MQTT → durable outbox → ERP/QMS APIs.",
    )
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
