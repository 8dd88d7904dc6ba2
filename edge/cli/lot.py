"""``edge lots`` and ``edge lot release`` — the lots the quality logic tracks, and releasing
one (the end of its hold episode), whether the gateway runs or not.

``edge lots -c FILE [--state S] [--limit N] [--json]`` reads the lots table of the outbox
file directly (a WAL reader never blocks the daemon): lot, state, hold episode, supplier,
last event and its age; lots stuck longer than ``quality.stuck_after_s`` are marked. With
``quality.reconcile`` configured, a ``mismatch`` column shows where the lot's status
differs between the gateway, the ERP and the QMS (from the last reconciliation round,
kept in the state dir's ``reconcile.json``; ``?`` marks a failed read); ``--json`` adds
each lot's ``reconcile`` entry.

``edge lot release LOT --reason TEXT --by NAME [-c FILE | --url URL]``: a release is an
explicit decision, so both are required; ``--by`` is who decided (it goes into the
``lot.status`` and ``quality.release`` events and the audit trail, beside the login or API
token that asked).

- Gateway running: the command asks it (``POST /lots/{lot}/release``); address and token
  are found as ``edge status`` finds them.
- Gateway stopped (``-c FILE`` and no gateway holds its ``state_dir``): the two events, the
  lot's new state and the ``lot_released`` audit row (actor ``cli:<user> by NAME``) are
  written to the outbox file in one transaction, holding the state dir's lock meanwhile;
  they are sent when the gateway starts, routed by the config's sinks.

Either way the events take the routes of any ``lot.status`` / ``quality.release``: to the
ERP / QMS, and to the local hold topic (a retained release replaces the retained hold).

Exit 0 when released; 1 when the lot is released already, the daemon does not answer or
refuses, or the file cannot be written; 2 for an unknown lot, bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from edge.cli.common import EXIT_CONFIG, load_or_exit
from edge.cli.daemon_api import DEFAULT_URL, request, target

STATES = ("unknown", "hold", "quarantine", "rejected", "released")


def register(sub: Any) -> None:
    p = sub.add_parser("lots", help="the lots the quality logic tracks (state, episode, "
                                    "supplier, last event)")
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.add_argument("--state", choices=STATES, help="only lots in this state")
    p.add_argument("--limit", type=int, default=200, metavar="N",
                   help="at most N lots, most recently changed first (default 200)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_lots)

    p = sub.add_parser("lot", help="act on a lot (release)")
    lsub = p.add_subparsers(dest="lot_command", metavar="ACTION")
    lsub.required = True
    r = lsub.add_parser("release", help="release a lot: end its hold episode (audited)")
    r.add_argument("lot_id", metavar="LOT", help="the lot's id (see `edge lots`)")
    r.add_argument("--reason", required=True, help="why it may be used; sent with the "
                                                   "release and recorded in the audit trail")
    r.add_argument("--by", required=True, metavar="NAME", help="who decided the release")
    r.add_argument("-c", "--config", metavar="FILE",
                   help="the gateway's config: API address and token file; with it, a "
                        "stopped gateway's lot is released in its outbox file")
    r.add_argument("--url", help=f"base URL of the gateway's API (default {DEFAULT_URL})")
    r.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    r.set_defaults(handler=cmd_release)


# --------------------------------------------------------------------------- edge lots

def cmd_lots(args: argparse.Namespace) -> int:
    from edge.app import quality_config
    from edge.cli.outbox import open_db
    from edge.outbox import lots
    from edge.timefmt import ago, duration

    if args.limit < 1:
        print("edge lots: --limit must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_or_exit(args.config, check_files=False)
    stuck_after_s = quality_config(cfg).stuck_after_s
    conn = open_db(cfg)
    try:
        rows = lots.list_lots(conn, now=time.time(), state=args.state,
                              stuck_after_s=stuck_after_s, limit=args.limit)
    except sqlite3.OperationalError as err:  # an outbox file older than the lots table
        print(f"edge lots: cannot read the lots table: {err} (start the gateway once with "
              "this version)", file=sys.stderr)
        return 1
    finally:
        conn.close()
    recon = _reconcile_file(cfg) if quality_config(cfg).reconcile is not None else None
    if recon is not None:
        for r in rows:
            r["reconcile"] = (recon.get("lots") or {}).get(r["lot_id"])
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no lots" + (f" in state {args.state}" if args.state else "")
              + " (the gateway records lots from receipts, inspection results and status "
                "events)")
        return 0
    if recon is not None:
        print(f"reconciliation: last round {ago(recon.get('at'))}" if recon.get("at")
              else "reconciliation: no round yet")
    print(f"{'lot':<20}{'state':<12}{'episode':>8}  {'supplier':<16}{'last event':<20}"
          f"{'age':>10}  {'in state':>10}" + ("  mismatch" if recon is not None else ""))
    for r in rows:
        last = r["last_event"] or {}
        flag = f"  STUCK (> {duration(stuck_after_s)})" if r.get("stuck") else ""
        flag += "  (failure waiting for its episode)" if r.get("pending") else ""
        age = ago(last.get("at")).removesuffix(" ago") if last else "-"
        column = f"  {mismatch_text(r.get('reconcile')):<8}" if recon is not None else ""
        print(f"{r['lot_id']:<20}{r['state']:<12}{r['episode']:>8}  "
              f"{(r['supplier'] or '-'):<16}{(last.get('type') or '-'):<20}{age:>10}  "
              f"{duration(r['age_s']):>10}{column}{flag}")
    return 0


def _reconcile_file(cfg: Any) -> dict[str, Any]:
    from edge.quality.reconcile import load_checks

    return load_checks(cfg.state_dir)


def mismatch_text(entry: dict[str, Any] | None) -> str:
    """``-`` (agrees), ``erp released`` (differs), ``qms ?`` (read failed), blank (not
    read in the last round)."""
    if not entry:
        return ""
    parts = []
    systems = entry.get("systems") or {}
    for m in entry.get("mismatches") or []:
        parts.append(str(m.get("text", m.get("between"))))
    for name, rd in systems.items():
        if rd.get("error"):
            parts.append(f"{name} ? ({rd['error']})")
    return "; ".join(parts) or "-"


# --------------------------------------------------------------------------- edge lot release

def cmd_release(args: argparse.Namespace) -> int:
    reason, by = args.reason.strip(), args.by.strip()
    if not reason:
        print("edge lot release: --reason must say why", file=sys.stderr)
        return EXIT_CONFIG
    if not by:
        print("edge lot release: --by must name who decided", file=sys.stderr)
        return EXIT_CONFIG
    if args.config:
        from edge.cli.sink import _gateway_stopped

        cfg = load_or_exit(args.config, check_files=False)
        with _gateway_stopped(cfg.state_dir) as stopped:
            if stopped:
                return _release_stopped(args, cfg, reason, by)
        if not cfg.api.enabled and not args.url:
            print(f"edge lot release: the gateway runs with its local API off (api.enabled: "
                  f"false in {args.config}): stop it, run this command again (it then "
                  "releases the lot in the outbox file), and start it", file=sys.stderr)
            return 1
    url, token = target(args, "lot release")
    path = f"/lots/{quote(args.lot_id, safe='')}/release"
    resp = request("lot release", "POST", url, path, token, timeout=args.timeout,
                   json={"reason": reason, "by": by})
    if resp is None:
        if not args.config:
            print("edge lot release: to release a lot of a stopped gateway, give its config: "
                  f"edge lot release {args.lot_id} -c FILE --reason ... --by ...",
                  file=sys.stderr)
        return 1
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if resp.status_code == 404 and isinstance(doc, dict):
        print(f"edge lot release: unknown lot {args.lot_id!r}: the gateway has seen no "
              "receipt, result or status of it (see `edge lots`)", file=sys.stderr)
        return EXIT_CONFIG
    if resp.status_code == 409 and isinstance(doc, dict):
        print(f"edge lot release: {_released_already(doc.get('lot') or {})}", file=sys.stderr)
        return 1
    if resp.status_code != 200 or not isinstance(doc, dict):
        print(f"edge lot release: {url}{path} answered {resp.status_code}: "
              f"{resp.text[:300]}", file=sys.stderr)
        return 1
    print(f"lot {args.lot_id} released by {by} (episode {doc.get('episode')}, was "
          f"{doc.get('previous_state')}): {reason}")
    return 0


def _released_already(lot: dict[str, Any]) -> str:
    when = f" at {lot['decided_at']}" if lot.get("decided_at") else ""
    who = f" by {lot['decided_by']}" if lot.get("decided_by") else ""
    return (f"lot {lot.get('lot_id')} is released already (episode {lot.get('episode')}"
            f"{who}{when}): nothing to release")


def _release_stopped(args: argparse.Namespace, cfg: Any, reason: str, by: str) -> int:
    """Release the lot in the outbox file of a stopped gateway (see the module docstring)."""
    from edge.cli.outbox import actor, open_db
    from edge.outbox import lots, queries
    from edge.rules import build_rules

    router = _router(cfg)
    conn = open_db(cfg, write=True)
    try:
        with queries.transaction(conn):
            row = lots.get_lot(conn, args.lot_id)
            if row is None:
                print(f"edge lot release: unknown lot {args.lot_id!r}: {args.config}'s "
                      "outbox has no receipt, result or status of it (see `edge lots`)",
                      file=sys.stderr)
                return EXIT_CONFIG
            if row.state == "released":
                from edge.timefmt import utc_iso

                print("edge lot release: " + _released_already({
                    "lot_id": row.lot_id, "episode": row.episode, "decided_by": row.decided_by,
                    "decided_at": utc_iso(row.decided_at) if row.decided_at else None}),
                    file=sys.stderr)
                return 1
            subs = build_rules(cfg.rules, cfg.site).release(
                row, by=by, reason=reason, actor=f"{actor()} by {by}")
            prepared = [(s, router(s.event.type), s.event.to_json()) for s in subs]
            queries.insert_events(conn, prepared,
                                  dedupe_window_s=cfg.outbox.dedupe_window_s)
    except sqlite3.Error as err:
        print(f"edge lot release: cannot write the outbox of the stopped gateway "
              f"({cfg.state_dir}): {err} (run it as a user that may write outbox.db)",
              file=sys.stderr)
        return 1
    finally:
        conn.close()
    unrouted = sorted({s.event.type for s, sinks, _ in prepared if not sinks})
    print(f"lot {args.lot_id} released by {by} (episode {row.episode}, was {row.state}): "
          f"{reason} (the gateway is stopped; the release is sent when it starts)")
    if unrouted:
        print(f"edge lot release: no sink has a route for {', '.join(unrouted)}: the lot's "
              "state is released, but that event is sent nowhere", file=sys.stderr)
    return 0


def _router(cfg: Any) -> Callable[[str], list[str]]:
    """The daemon's routing: the sinks built from the config (no I/O) and their
    ``accepts``."""
    from edge.components import ComponentContext
    from edge.registry import default_registry
    from edge.telemetry import Metrics

    registry, metrics = default_registry(), Metrics()
    sinks = {s.id: registry.get("sink", s.type).factory(
        s, ComponentContext(site=cfg.site, state_dir=cfg.state_dir, metrics=metrics))
        for s in cfg.sinks}
    return lambda event_type: [sid for sid, sink in sinks.items() if sink.accepts(event_type)]
