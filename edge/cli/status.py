"""``edge status [-c FILE | --url URL] [--json]`` — ask the running gateway (GET /status).

The address comes from ``--url``, else from the config's ``api.listen``, else the default
``http://127.0.0.1:8080``. The token comes from the config's ``api.token_file``, else from
``$EDGE_API_TOKEN``. Exit 0 with the report; 1 when the daemon does not answer, refuses the
token or cannot report; 2 on bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from edge.cli.common import load_or_exit

DEFAULT_URL = "http://127.0.0.1:8080"
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


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(base URL, token) from the arguments, the config file and the environment."""
    from edge.api.auth import load_tokens
    from edge.errors import FatalStartupError

    url, token = args.url, os.environ.get("EDGE_API_TOKEN") or None
    if args.config:
        cfg = load_or_exit(args.config, check_files=False)
        if not cfg.api.enabled and not url:
            print(f"{args.config}: the local API is off (api.enabled: false); use "
                  f"`edge outbox stats -c {args.config}` to read the outbox directly",
                  file=sys.stderr)
            raise SystemExit(1)
        if url is None:
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.api.host, cfg.api.host)
            url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.api.port}"
        if cfg.api.token_file:
            try:
                token = load_tokens(cfg.api.token_file)[0].secret.decode()
            except FatalStartupError as err:
                print(f"edge status: {err}", file=sys.stderr)
                raise SystemExit(1) from err
    return (url or DEFAULT_URL).rstrip("/"), token


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url, token = _target(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{url}/status", headers=headers, timeout=args.timeout,
                         trust_env=False)
    except httpx.ConnectError:
        print(f"edge status: the gateway is not running (nothing answers at {url})",
              file=sys.stderr)
        return 1
    except httpx.TimeoutException:
        print(f"edge status: {url} did not answer within {args.timeout:g} s "
              "(the gateway may be overloaded or hung)", file=sys.stderr)
        return 1
    except httpx.HTTPError as err:
        print(f"edge status: cannot ask {url}: {err}", file=sys.stderr)
        return 1
    if resp.status_code == 401:
        print(f"edge status: {url} refused the token: give the config with its "
              "api.token_file (-c FILE) or set EDGE_API_TOKEN", file=sys.stderr)
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
    from edge.api.summary import ago, duration, overall, problems

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
    lines.append("")
    for c in report.get("components") or []:
        conn = "" if c.get("kind") != "source" else (
            "connected" if c.get("connected") else "not connected")
        lines.append(f"{c.get('kind', ''):<7}{c.get('id', ''):<16}{c.get('type', ''):<8}"
                     f"{c.get('state', ''):<10}{conn}")
    ob = report.get("outbox") or {}
    b = ob.get("budget") or {}
    ttf = b.get("time_to_full_s")
    pct = b.get("percent") or 0.0
    lines.append(f"outbox: {ob.get('events', 0)} events, {b.get('used_bytes', 0) / MB:.1f} MB "
                 f"of {b.get('budget_bytes', 0) / MB:.0f} MB ({pct:.1f} %)"
                 + (f", full in about {duration(ttf)}" if ttf and pct >= 50 else "")
                 + ("" if ob.get("accepting", True) else ", REFUSING NEW EVENTS"))
    return lines
