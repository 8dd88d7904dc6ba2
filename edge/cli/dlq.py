"""``edge dlq list|show|replay|discard -c FILE`` — dead letters, read and repaired in the file.

Works with the daemon running (WAL: readers never block it; an action takes the write lock
for one short transaction and the forwarder picks replayed rows up on its next pass) and
with it stopped. ``replay`` and ``discard`` require ``--reason``; both are written to the
audit trail with the actor ``cli:<user>`` in the same transaction as the change.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge.cli.common import load_or_exit
from edge.cli.outbox import actor, open_db


def register(sub: Any) -> None:
    p = sub.add_parser("dlq", help="list, show, replay or discard dead letters")
    dsub = p.add_subparsers(dest="dlq_command", metavar="ACTION")
    dsub.required = True

    s = dsub.add_parser("list", help="dead letters, oldest first")
    s.add_argument("-c", "--config", required=True, metavar="FILE")
    s.add_argument("--sink", help="only this sink")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=cmd_list)

    s = dsub.add_parser("show", help="one dead letter: reason, response body, the event")
    s.add_argument("ref", metavar="ID", help="dead-letter id (from `list`) or event id")
    s.add_argument("-c", "--config", required=True, metavar="FILE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=cmd_show)

    for action, text in (("replay", "queue dead letters for delivery again"),
                         ("discard", "delete dead letters for good")):
        s = dsub.add_parser(action, help=f"{text} (audited)")
        s.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead-letter ids")
        s.add_argument("-c", "--config", required=True, metavar="FILE")
        s.add_argument("--sink", help="every dead letter of this sink")
        s.add_argument("--reason", required=True, help="why; recorded in the audit trail")
        s.set_defaults(handler=cmd_action, action=action)


def cmd_list(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    cfg = load_or_exit(args.config, check_files=False)
    conn = open_db(cfg)
    try:
        rows = queries.dlq_list(conn, sink=args.sink, limit=args.limit)
    finally:
        conn.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no dead letters" + (f" for sink {args.sink}" if args.sink else ""))
        return 0
    print(f"{'id':>6}  {'sink':<12}{'status':>6}  {'class':<9}{'type':<20}{'key':<16}"
          f"{'dead since':<21}reason")
    for r in rows:
        print(f"{r['id']:>6}  {r['sink']:<12}{r['status'] or '-':>6}  {r['class']:<9}"
              f"{r['type']:<20}{r['ordering_key'] or '-':<16}{r['dead_at'][:19]:<21}"
              f"{_one_line(r['reason'], 60)}")
    print(f"\n{len(rows)} shown; details: edge dlq show ID -c {args.config}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    cfg = load_or_exit(args.config, check_files=False)
    conn = open_db(cfg)
    try:
        found = queries.dlq_show(conn, args.ref)
    finally:
        conn.close()
    if found is None:
        print(f"no dead letter {args.ref} (see `edge dlq list -c {args.config}`)",
              file=sys.stderr)
        return 1
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for key in ("id", "sink", "event_id", "type", "class", "ordering_key", "status",
                "attempts", "dead_at", "reason"):
        print(f"{key + ':':<14}{found[key]}")
    print(f"{'response:':<14}{found['response_body'] or '(empty)'}")
    print("event:")
    print(json.dumps(found["event"], indent=2) if found["event"] else "  (not stored)")
    print(f"\nfix the cause, then: edge dlq replay {found['id']} -c {args.config} --reason ...")
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    from edge.outbox import queries

    if not args.ids and not args.sink:
        print(f"edge dlq {args.action}: give dead-letter ids or --sink SINK", file=sys.stderr)
        return 2
    if not args.reason.strip():
        print(f"edge dlq {args.action}: --reason must say why", file=sys.stderr)
        return 2
    cfg = load_or_exit(args.config, check_files=False)
    fn = queries.dlq_replay if args.action == "replay" else queries.dlq_discard
    who = actor()
    conn = open_db(cfg, write=True)
    try:
        with queries.transaction(conn):
            sinks = _sinks_of(conn, args.ids) if args.ids else {args.sink}
            n = fn(conn, ids=args.ids or None, sink=args.sink, actor=who,
                   reason=args.reason.strip())
    finally:
        conn.close()
    if n == 0:
        print("nothing matched: no such dead letter"
              + (f" for sink {args.sink}" if args.sink else ""), file=sys.stderr)
        return 1
    done = "replayed" if args.action == "replay" else "discarded"
    print(f"{done} {n} dead letter(s) as {who}: {args.reason.strip()}")
    missing = sorted(sinks - {s.id for s in cfg.sinks})
    if args.action == "replay" and missing:
        print(f"warning: sink(s) {', '.join(missing)} are not in {args.config}: the replayed "
              "events wait until you reroute them (edge outbox reroute)", file=sys.stderr)
    return 0


def _sinks_of(conn: Any, ids: list[int]) -> set[str]:
    marks = ",".join("?" * len(ids))
    return {r[0] for r in conn.execute(
        f"SELECT DISTINCT sink FROM dead_letters WHERE id IN ({marks})", ids)}


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
