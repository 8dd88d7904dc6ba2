"""``edge relay -c FILE`` — run a relay of the JetStream tier (``edge.relay``);
``edge relay dlq list|replay|discard -c FILE`` — the relays' shared dead letters.

``replay`` and ``discard`` act on a parked key (``--sink ID --key KEY``): they mark it in
the parked bucket with who and why; the relay that owns the key's partition then sends
the key's dead letters again, in order and before its later events, or drops them, and
lets the key flow. Exit codes: 0 ok; 1 runtime failure (``dlq``: NATS unreachable, nothing
to replay); 2 bad usage or config, refused NATS credentials or TLS, a stream without
limits retention. ``edge relay`` waits (and logs why) while NATS is unreachable or the
stream does not exist yet.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from edge.cli.common import load_or_exit, run_async


def register(sub: Any) -> None:
    p = sub.add_parser("relay", help="run a relay of the JetStream tier (or manage its "
                       "dead letters: relay dlq ...)")
    p.add_argument("-c", "--config", metavar="FILE", help="the relay's config file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "text", "json"],
                   help="override logging.format: json lines, text, or auto (json unless "
                   "stderr is a terminal)")
    p.set_defaults(handler=cmd_relay)
    rsub = p.add_subparsers(dest="relay_command", metavar="ACTION")
    d = rsub.add_parser("dlq", help="the relays' dead letters and parked keys")
    dsub = d.add_subparsers(dest="dlq_command", metavar="ACTION")
    dsub.required = True
    for name, helptext in (("list", "list dead letters and parked keys"),
                           ("replay", "send a parked key's dead letters again, in order"),
                           ("discard", "drop a parked key's dead letters and let it flow")):
        a = dsub.add_parser(name, help=helptext)
        a.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
        if name == "list":
            a.add_argument("--sink", metavar="ID")
            a.add_argument("--json", action="store_true")
        else:
            a.add_argument("--sink", metavar="ID", required=True)
            a.add_argument("--key", metavar="KEY", required=True, help="the ordering key, "
                           "e.g. lot:L-1001 (the event id for an event without one)")
            a.add_argument("--reason", required=True, help="why; logged by the relay")
            a.add_argument("--by", metavar="NAME", help="who decided (default: login name)")
        a.set_defaults(handler=cmd_dlq)


def cmd_relay(args: argparse.Namespace) -> int:
    if not args.config:
        print("edge relay: -c FILE is required", file=sys.stderr)
        return 2
    from edge.cli.common import config_exit
    from edge.config import check_secret_files
    from edge.errors import ConfigError, FatalStartupError, StartupError
    from edge.nats.connection import NatsConnectError
    from edge.relay.config import RelayFileConfigBase
    from edge.relay.relay import Relay
    from edge.telemetry import setup_logging

    cfg = _relay_config(args.config)
    # a secret that cannot be read is a config error (exit 2, located), as for `edge run`
    secret_errors, secret_warnings = check_secret_files(cfg)
    if secret_errors:
        config_exit(args.config, ConfigError(secret_errors))
    setup_logging(args.log_level or cfg.logging.level,
                  args.log_format or cfg.logging.format)
    for issue in secret_warnings:
        logging.getLogger("edge.config").warning("%s", issue)
    assert isinstance(cfg, RelayFileConfigBase)
    try:
        run_async(Relay(cfg, config_path=args.config).run())
    except ConfigError as err:
        config_exit(args.config, err)
    except (FatalStartupError, NatsConnectError) as err:
        # refused credentials, TLS, a stream with the wrong retention: a restart cannot
        # fix them (exit 2, the unit's RestartPreventExitStatus)
        print(f"edge relay: cannot start: {err}", file=sys.stderr)
        return 2
    except StartupError as err:
        print(f"edge relay: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


def _relay_config(path: str) -> Any:
    cfg = load_or_exit(path)
    if not hasattr(cfg, "relay"):
        print(f"{path}: not a relay config (it has no `relay:` section; a gateway runs "
              "with `edge run -c FILE`)", file=sys.stderr)
        raise SystemExit(2)
    return cfg


def cmd_dlq(args: argparse.Namespace) -> int:
    path = getattr(args, "config", None)
    if not path:
        print("edge relay dlq: -c FILE is required", file=sys.stderr)
        return 2
    cfg = _relay_config(path)
    logging.basicConfig(level=logging.WARNING)
    from pathlib import Path

    return int(asyncio.run(_dlq(cfg, args, str(Path(path).resolve().parent))))


async def _dlq(cfg: Any, args: argparse.Namespace, config_dir: str) -> int:
    from edge.nats.connection import NatsConnectError, connect
    from edge.relay.deadletters import DeadLetters

    try:
        nc = await connect(cfg.relay, name="edge-relay-cli",
                           config_dir=config_dir)
    except NatsConnectError as err:
        print(f"edge relay dlq: {err}", file=sys.stderr)
        return 1
    try:
        dead = DeadLetters(nc.jetstream(), cfg.relay)
        await dead.setup()
        if args.dlq_command == "list":
            return await _list(dead, args)
        by = args.by or _login()
        state = "replay" if args.dlq_command == "replay" else "discard"
        problem = await dead.request(args.sink, args.key, state, by=by, why=args.reason)
        if problem is not None:
            print(f"edge relay dlq {args.dlq_command}: {problem}", file=sys.stderr)
            return 1
        print(f"{args.key}: {state} requested for sink {args.sink}; the relay owning its "
              "partition carries it out within seconds")
        return 0
    finally:
        await nc.close()


async def _list(dead: Any, args: argparse.Namespace) -> int:
    entries = await dead.entries(args.sink)
    parks = [p for p in await dead.all_states() if args.sink in (None, p.sink)]
    if args.json:
        json.dump({
            "dead_letters": [{"seq": e.seq, "kind": e.kind, **{
                k.removeprefix("Edge-").lower().replace("-", "_"): v
                for k, v in e.headers.items()}} for e in entries],
            "parked": [{"sink": p.sink, "key": p.key, "state": p.state, **p.doc}
                       for p in parks],
        }, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{len(parks)} parked key(s), {len(entries)} dead-letter message(s)")
    for p in parks:
        print(f"  parked  {p.sink:<12} {p.key:<24} {p.state:<8} behind "
              f"{p.doc.get('event_id')}  {p.doc.get('reason', '')[:80]}")
    for e in entries:
        h = e.headers
        when = datetime.fromtimestamp(float(h.get("Edge-Time", 0)), UTC).strftime("%FT%TZ")
        print(f"  {e.seq:>6} {e.kind:<11} {h.get('Edge-Sink', ''):<12} "
              f"{h.get('Edge-Event-Id', ''):<36} {h.get('Edge-Ordering-Key', '-'):<20} "
              f"{when} {h.get('Edge-Status', '-'):>4} {h.get('Edge-Reason', '')[:60]}")
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in a container
        return "unknown"
