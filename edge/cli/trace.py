"""``edge trace ID -c FILE`` / ``edge trace --key KEY -c FILE`` — where is record X?

Reads the audit trail in the outbox file (daemon running or stopped) and prints the
lineage of an event as a timeline: stored, retries, delivered / dead-lettered / replayed /
discarded (by whom and why), and where it is now for each sink. ``--json`` prints the same
document as ``GET /trace``. Exit 1 when the outbox has no trace of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge.cli.common import load_or_exit
from edge.cli.outbox import open_db


def register(sub: Any) -> None:
    p = sub.add_parser("trace", help="lineage of an event from the audit trail")
    p.add_argument("event_id", nargs="?", metavar="ID", help="event id (UUIDv7)")
    p.add_argument("--key", help="every event of an ordering key, e.g. lot:L1")
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    from edge.api import lineage

    if bool(args.event_id) == bool(args.key):
        print("edge trace: give an event ID or --key KEY (one of them)", file=sys.stderr)
        return 2
    cfg = load_or_exit(args.config, check_files=False)
    conn = open_db(cfg)
    try:
        if args.key:
            doc = lineage.trace_key(conn, args.key)
        else:
            doc = lineage.trace_event(conn, args.event_id)
    finally:
        conn.close()
    if doc is None:
        what = f"ordering key {args.key}" if args.key else f"event {args.event_id}"
        print(f"no trace of {what} in the outbox of {args.config} (audit rows older than "
              f"{cfg.outbox.audit_retention_days:g} days are pruned)", file=sys.stderr)
        return 1
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    events = doc["events"] if args.key else [doc]
    if args.key:
        print(f"ordering key {args.key}: {len(events)} event(s), oldest first\n")
    print("\n\n".join("\n".join(lineage.format_timeline(ev)) for ev in events))
    return 0
