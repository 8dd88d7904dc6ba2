"""``edge demo`` — the built-in demo: simulated stations → MQTT → gateway → stand-in ERP."""

from __future__ import annotations

import argparse
from typing import Any

from edge.cli.common import run_async


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in demo (own broker, simulated stations, stand-in ERP)",
        description="Runs the gateway with its packaged demo configuration against an MQTT "
        "broker it starts itself (mosquitto if installed, else an embedded one), simulated "
        "inspection stations and a stand-in ERP, all on loopback. Prints a live line every "
        "second and, at the end, whether every message the broker confirmed reached the "
        "ERP exactly once. Exit code 0: nothing lost or duplicated.",
    )
    p.add_argument("--duration", type=float, default=0.0, metavar="S",
                   help="seconds to run; 0 = until Ctrl-C (default)")
    p.add_argument("--outage", type=float, default=0.0, metavar="S",
                   help="take the stand-in ERP down for S seconds (watch the backlog)")
    p.add_argument("--outage-at", type=float, default=5.0, metavar="S",
                   help="when the outage starts, seconds after the stations (default 5)")
    p.add_argument("--stations", type=int, default=3, help="simulated stations (default 3)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="messages per second, all stations together (default 20)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the outbox here (default: a temporary directory, removed)")
    p.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                   help="auto: mosquitto when installed, else the embedded broker")
    p.add_argument("--no-api", action="store_true", help="do not start the local API")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="warning", help="gateway log level on stderr (default warning)")
    p.add_argument("--log-format", choices=["auto", "text", "json"], default="auto",
                   help="gateway log lines on stderr: text, json, or auto (default: text on "
                   "a terminal, json lines otherwise)")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from edge.demo import Demo, DemoOptions
    from edge.demo.broker import BrokerUnavailable
    from edge.telemetry import setup_logging

    if args.stations < 1 or args.rate <= 0 or args.duration < 0 or args.outage < 0:
        print("error: --stations must be >= 1, --rate > 0, --duration and --outage >= 0")
        return 2
    setup_logging(args.log_level, args.log_format)
    options = DemoOptions(
        duration_s=args.duration or None, outage_s=args.outage, outage_at_s=args.outage_at,
        stations=args.stations, rate=args.rate, state_dir=args.state_dir,
        broker=args.broker, api=not args.no_api,
    )
    try:
        return int(run_async(Demo(options).run()))
    except BrokerUnavailable as err:
        print(f"error: {err}")
        return 1
