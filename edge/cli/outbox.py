"""``edge outbox stats|reroute|discard`` — read or repair the outbox file directly.

Works while the daemon runs (WAL readers never block it; repairs take the write lock
briefly) and while it is stopped.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from edge.cli.common import load_or_exit


def register(sub: Any) -> None:
    p = sub.add_parser("outbox", help="inspect or repair the local outbox")
    osub = p.add_subparsers(dest="outbox_command", metavar="ACTION")
    osub.required = True

    s = osub.add_parser("stats", help="depth per sink and class, oldest age, dead letters")
    s.add_argument("-c", "--config", required=True, metavar="FILE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=cmd_stats)

    s = osub.add_parser("reroute", help="move queued rows of a (removed) sink to another sink")
    s.add_argument("-c", "--config", required=True, metavar="FILE")
    s.add_argument("--from", dest="from_sink", required=True)
    s.add_argument("--to", dest="to_sink", required=True)
    s.add_argument("--reason", required=True, help="recorded in the audit trail")
    s.set_defaults(handler=cmd_reroute)

    s = osub.add_parser("discard", help="drop every queued row of a sink (audited)")
    s.add_argument("-c", "--config", required=True, metavar="FILE")
    s.add_argument("--sink", required=True)
    s.add_argument("--reason", required=True, help="recorded in the audit trail")
    s.set_defaults(handler=cmd_discard)


def open_db(cfg: Any, *, write: bool = False) -> sqlite3.Connection:
    from edge.outbox.dbthread import connect

    path = str(Path(cfg.state_dir) / "outbox.db")
    if not Path(path).exists():
        print(f"no outbox at {path} (has the gateway run with this config?)", file=sys.stderr)
        raise SystemExit(1)
    return connect(path, readonly=False, synchronous="FULL") if write else connect(path)


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def cmd_stats(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    cfg = load_or_exit(args.config, check_files=False)
    conn = open_db(cfg)
    try:
        st = queries.stats(conn)
        st["path"] = str(Path(cfg.state_dir) / "outbox.db")
        st["used_bytes"] = queries.used_bytes(conn, st["path"])
        st["budget_bytes"] = int(cfg.outbox.max_size_mb * 1024 * 1024)
    finally:
        conn.close()
    configured = {s.id for s in cfg.sinks}
    for sid, entry in st["sinks"].items():
        entry["configured"] = sid in configured
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"outbox {st['path']}: {st['events']} events, "
          f"{st['used_bytes'] / 1e6:.1f} MB of {st['budget_bytes'] / 1e6:.0f} MB")
    print(f"{'sink':<16}{'critical':>9}{'high':>9}{'normal':>9}{'low':>9}{'total':>9}"
          f"{'retrying':>10}{'oldest':>10}{'dead':>7}")
    for sid in sorted(st["sinks"]):
        e = st["sinks"][sid]
        d = e["depth"]
        age = e["oldest_age_s"]
        name = sid if e["configured"] else f"{sid} (removed)"
        print(f"{name:<16}{d['critical']:>9}{d['high']:>9}{d['normal']:>9}{d['low']:>9}"
              f"{e['total']:>9}{e['retrying']:>10}{_age(age):>10}{e['dead_letters']:>7}")
    if not st["sinks"]:
        print("(empty: nothing queued, no dead letters)")
    if st["quarantine"]:
        q = ", ".join(f"{k}={v}" for k, v in sorted(st["quarantine"].items()))
        print(f"quarantined inbound records: {q}")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_reroute(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    cfg = load_or_exit(args.config, check_files=False)
    if args.to_sink not in {s.id for s in cfg.sinks}:
        print(f"--to {args.to_sink!r} is not a sink in {args.config}", file=sys.stderr)
        return 2
    conn = open_db(cfg, write=True)
    try:
        with queries.transaction(conn):
            n = queries.reroute_sink(conn, from_sink=args.from_sink, to_sink=args.to_sink,
                                     actor=actor(), reason=args.reason)
    finally:
        conn.close()
    print(f"rerouted {n} event(s) from {args.from_sink} to {args.to_sink}")
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    cfg = load_or_exit(args.config, check_files=False)
    conn = open_db(cfg, write=True)
    try:
        with queries.transaction(conn):
            n = queries.discard_sink(conn, sink=args.sink, actor=actor(), reason=args.reason)
    finally:
        conn.close()
    print(f"discarded {n} queued event(s) of sink {args.sink} at {time.strftime('%H:%M:%S')}")
    return 0
