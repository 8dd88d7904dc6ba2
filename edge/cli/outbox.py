"""``edge outbox stats|reroute|discard|salvage`` — read or repair the outbox file directly.

Works while the daemon runs (WAL readers never block it; repairs take the write lock
briefly) and while it is stopped. ``salvage FILE`` re-queues what a moved-aside (corrupt)
outbox file still holds (``edge.outbox.salvage``); exit 1 when FILE cannot be read at all.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.cli.common import load_or_exit
from edge.timefmt import duration


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

    s = osub.add_parser("salvage", help="re-queue the readable events of a moved-aside "
                        "(corrupt) outbox file into the live outbox (audited)")
    s.add_argument("file", metavar="FILE", help="the moved file (outbox.db.corrupt-<time>)")
    s.add_argument("-c", "--config", metavar="CONFIG",
                   help="the gateway's config: its outbox and its routes (needed where the "
                        "delivery rows of an event are unreadable); without it the live "
                        "outbox is outbox.db beside FILE")
    s.add_argument("--dry-run", action="store_true", help="read and report, change nothing")
    s.add_argument("--json", action="store_true", help="machine-readable summary")
    s.set_defaults(handler=cmd_salvage)


def open_db(cfg: Any, *, write: bool = False) -> sqlite3.Connection:
    from edge.cli.common import open_outbox_or_exit

    path = str(Path(cfg.state_dir) / "outbox.db")
    if not Path(path).exists():
        print(f"no outbox at {path} (has the gateway run with this config?)", file=sys.stderr)
        raise SystemExit(1)
    conn: sqlite3.Connection = open_outbox_or_exit(path, write=write)
    return conn


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
              f"{e['total']:>9}{e['retrying']:>10}{duration(age):>10}{e['dead_letters']:>7}")
    if not st["sinks"]:
        print("(empty: nothing queued, no dead letters)")
    if st["quarantine"]:
        q = ", ".join(f"{k}={v}" for k, v in sorted(st["quarantine"].items()))
        print(f"quarantined inbound records: {q}")
    return 0


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


def _router(cfg: Any) -> Callable[[str], list[str]]:
    """Sinks whose routes accept an event type (the daemon's routing, from the config)."""
    def route(event_type: str) -> list[str]:
        return [s.id for s in cfg.sinks
                if any(r.matches(event_type) for r in getattr(s, "routes", None) or [])]
    return route


def _live_path(file: Path, cfg: Any) -> Path:
    if cfg is not None:
        return Path(cfg.state_dir) / "outbox.db"
    name = file.name.split(".corrupt-")[0] if ".corrupt-" in file.name else "outbox.db"
    return file.parent / name


def cmd_salvage(args: argparse.Namespace) -> int:
    from edge.outbox.dbthread import connect
    from edge.outbox.salvage import Salvage, SalvageError, open_reader
    from edge.outbox.schema import SCHEMA_VERSION

    file = Path(args.file)
    cfg = load_or_exit(args.config, check_files=False) if args.config else None
    live_path = _live_path(file, cfg)
    if not file.is_file():
        print(f"edge outbox salvage: no file {file}", file=sys.stderr)
        return 2
    if not live_path.exists():
        print(f"edge outbox salvage: no live outbox at {live_path}: start the gateway once "
              "(it creates a fresh outbox) or give its config with -c", file=sys.stderr)
        return 2
    if live_path.resolve() == file.resolve():
        print(f"edge outbox salvage: {file} is the live outbox; salvage reads a file the "
              "gateway moved aside (outbox.db.corrupt-<time>)", file=sys.stderr)
        return 2
    try:
        reader, tmp = open_reader(str(file))
    except SalvageError as err:
        print(f"edge outbox salvage: {err}", file=sys.stderr)
        return 1
    live = connect(str(live_path), readonly=False, synchronous="FULL")
    try:
        version = live.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            print(f"edge outbox salvage: the live outbox {live_path} has schema version "
                  f"{version}, this command writes version {SCHEMA_VERSION}", file=sys.stderr)
            return 2
        report = Salvage(reader, live, actor=actor(), dry_run=args.dry_run,
                         router=_router(cfg) if cfg is not None else None).run()
    finally:
        live.close()
        reader.conn.close()
        tmp.cleanup()
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for line in summary_lines(report, live_path):
        print(line)
    return 0


def summary_lines(report: Any, live_path: Path) -> list[str]:
    r = report.to_json()
    un = r["unreadable"]
    verb = "would re-queue" if r["dry_run"] else "re-queued"
    out = [f"salvage of {r['file']} into {live_path}"
           + (" (dry run: nothing changed)" if r["dry_run"] else ""),
           f"  rows read:        {r['rows_read']} event(s)"
           + (" (the file header was unusable and was rebuilt on a copy)" if r["header_rebuilt"]
              else ""),
           f"  {verb + ':':<18}{r['requeued']} event(s), {r['deliveries']} delivery row(s)"
           f" ({r['kept_seq']} under their own seq, {r['new_seq']} under new seqs)",
           f"  already present:  {r['already_present']} (in the live outbox or salvaged "
           f"before; {r['redelivered']} stored again from a broker redelivery)",
           f"  dead letters:     {r['dead_letters_found']} found, "
           f"{r['dead_letters_requeued']} {verb} to the dead-letter table "
           "(see edge dlq list)"]
    if r["nothing_to_deliver"]:
        out.append(f"  nothing to do:    {r['nothing_to_deliver']} event(s) had no delivery "
                   "left")
    if r["routed_by_config"]:
        out.append(f"  routed by config: {r['routed_by_config']} event(s) whose delivery rows "
                   "were unreadable (a sink may get them again; it dedupes by id)")
    if r["no_route"]:
        out.append(f"  NOT re-queued:    {len(r['no_route'])} event(s) whose delivery rows "
                   "were unreadable and no route is known (give -c CONFIG): "
                   + ", ".join(r["no_route"][:20]))
    if r["digest_mismatch"]:
        out.append(f"  digest mismatch:  {len(r['digest_mismatch'])} event(s) whose body no "
                   "longer matches its SHA-256, dead-lettered, never sent: "
                   + ", ".join(r["digest_mismatch"][:20]))
    if un["count"] or un["seq_ranges"]:
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in un["seq_ranges"])
        out.append(f"  UNREADABLE:       {un['count']} event(s) lost in seq range(s) {ranges}"
                   + (f" ({un['ids_unknown']} without a known id)" if un["ids_unknown"]
                      else ""))
        out.append("    their bodies are gone; ask the receiver whether these ids arrived:")
        for eid in un["event_ids"][:50]:
            out.append(f"    lost event {eid}")
        if len(un["event_ids"]) > 50:
            out.append(f"    ... {len(un['event_ids']) - 50} more (use --json)")
    else:
        out.append("  unreadable:       none")
    for table, ranges in r["other_tables_lost"].items():
        out.append(f"  {table}: rows lost in rowid range(s) "
                   + ", ".join(f"{a}-{b}" for a, b in ranges))
    return out
