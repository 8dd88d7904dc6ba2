"""``edge status [-c FILE | --url URL] [--json]`` — ask the running gateway (GET /status).

The address comes from ``--url``, else from the config's ``api.listen``, else the default
``http://127.0.0.1:8080``. The token comes from the config's ``api.token_file``, else from
``$EDGE_API_TOKEN``. Exit 0 with the report; 1 when the daemon does not answer, refuses the
token or cannot report; 2 on bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge.cli.daemon_api import DEFAULT_URL, request, target

CLASSES = ("critical", "high", "normal", "low")
MB = 1024 * 1024  # outbox.max_size_mb counts in these


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="status of the running gateway (asks its local API)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="the gateway's config: API address and token file")
    p.add_argument("--url", help=f"base URL of the gateway's API (default {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the /status document")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    p.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    url, token = target(args, "status")
    resp = request("status", "GET", url, "/status", token, timeout=args.timeout)
    if resp is None:
        return 1
    if resp.status_code != 200:
        print(f"edge status: {url}/status answered {resp.status_code}: {resp.text[:300]}",
              file=sys.stderr)
        return 1
    report = resp.json()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(format_report(report)))
    return 0


def format_report(report: dict[str, Any]) -> list[str]:
    """The report as the few lines an operator reads first."""
    from edge.api.summary import overall, problems
    from edge.timefmt import ago, duration

    found = problems(report)
    state = {"ok": "OK", "degraded": "NEEDS ATTENTION", "critical": "PROBLEM"}[overall(found)]
    lines = [f"{report.get('site')}: {state}  (edge-gateway {report.get('version')}, "
             f"up {duration(report.get('uptime_s'))})"]
    lines += [f"  ! {p.subject}: {p.message}" + (f" (since {p.since})" if p.since else "")
              for p in found]
    lines.append("")
    lines.append(f"{'sink':<16}{'reachable':<11}" + "".join(f"{c:>9}" for c in CLASSES)
                 + f"{'waiting':>9}{'retrying':>10}{'oldest':>9}{'dead':>6}  last delivery")
    for sid, s in sorted((report.get("sinks") or {}).items()):
        reach = ("removed" if not s.get("configured", True)
                 else "NO" if s.get("up") is False else "yes")
        depth = s.get("depth") or {}
        lines.append(f"{sid:<16}{reach:<11}" + "".join(f"{depth.get(c, 0):>9}" for c in CLASSES)
                     + f"{s.get('total', 0):>9}{s.get('retrying', 0):>10}"
                     f"{duration(s.get('oldest_age_s')):>9}{s.get('dead_letters', 0):>6}  "
                     f"{ago(s.get('last_delivery'))}")
    parked = [(sid, k) for sid, s in sorted((report.get("sinks") or {}).items())
              for k in s.get("parked_keys") or []]
    if parked:
        total = sum((s.get("parked") or 0) for s in (report.get("sinks") or {}).values())
        lines.append("")
        lines.append(f"parked keys: {total} (their later events wait until the dead letter "
                     "is replayed or discarded: edge dlq show|replay|discard)")
        for sid, k in parked:
            lines.append(f"  {sid:<14}{k.get('key', ''):<24}dead letter #{k.get('dead_letter_id')}"
                         f"  since {str(k.get('since', ''))[:19]}  {k.get('waiting', 0)} waiting")
    lines += _business_lines(report)
    lines.append("")
    for c in report.get("components") or []:
        conn = "" if c.get("kind") != "source" else (
            "connected" if c.get("connected") else "not connected")
        lines.append(f"{c.get('kind', ''):<7}{c.get('id', ''):<16}{c.get('type', ''):<8}"
                     f"{c.get('state', ''):<10}{conn}")
    ob = report.get("outbox") or {}
    b = ob.get("budget") or {}
    pct = b.get("percent") or 0.0
    lines.append(f"outbox: {ob.get('events', 0)} events, {b.get('used_bytes', 0) / MB:.1f} MB "
                 f"of {b.get('budget_bytes', 0) / MB:.0f} MB ({pct:.1f} %)"
                 + _forecast_text(b)
                 + ("" if ob.get("accepting", True) else ", REFUSING NEW EVENTS"))
    return lines


def _forecast_text(budget: dict[str, Any]) -> str:
    """``, full in about 3.2 h ...`` / ``, not growing`` as ``/status`` says it (the
    forecast is given only for a steady rise of the live data; older gateways send only
    ``time_to_full_s``)."""
    from edge.timefmt import duration

    forecast = budget.get("forecast") or {}
    if forecast.get("text"):
        return f", {forecast['text']}"
    ttf = budget.get("time_to_full_s")
    return f", full in about {duration(ttf)}" if ttf is not None else ""


def _business_lines(report: dict[str, Any]) -> list[str]:
    """Lots, delivery SLAs and reconciliation in a few lines (absent in older reports)."""
    from edge.timefmt import ago, duration

    out: list[str] = []
    lots = report.get("lots") or {}
    if lots:
        by = lots.get("by_state") or {}
        out.append(f"lots: {lots.get('total', 0)} ("
                   + ", ".join(f"{k} {v}" for k, v in by.items() if v)
                   + f"); stuck {lots.get('stuck', 0)}, delayed dispositions "
                   f"{lots.get('delayed_dispositions', 0)}")
    rec = lots.get("reconcile") or {}
    if rec.get("enabled"):
        out.append(f"reconciliation ({', '.join(s.get('system', '') for s in rec.get('systems') or [])}"
                   f", every {duration(rec.get('every_s'))}): last round "
                   f"{ago(rec.get('last_round'))}, {rec.get('lots_checked', 0)} lots, "
                   f"{rec.get('mismatches', 0)} mismatch(es), {rec.get('unknown', 0)} failed "
                   f"read(s), {len(rec.get('applied') or [])} decision(s) applied")
    business = report.get("business") or {}
    for sla in business.get("sla") or []:
        state = (f"LATE by {duration(sla.get('late_s'))}" if sla.get("breached") else "ok")
        out.append(f"SLA {sla.get('type')} within {duration(sla.get('within_s'))}: {state} "
                   f"({sla.get('waiting', 0)} waiting, oldest "
                   f"{duration(sla.get('oldest_age_s'))})")
    nt = business.get("notifications") or {}
    if nt.get("dead_letters") or nt.get("retrying"):
        out.append(f"supplier notifications: {nt.get('dead_letters', 0)} dead-lettered, "
                   f"{nt.get('retrying', 0)} retrying")
    return [""] + out if out else []
