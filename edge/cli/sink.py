"""``edge sink resume ID --reason TEXT [--by NAME] [-c FILE | --url URL]`` — let a paused
sink send again (asks the running gateway: ``POST /sinks/{id}/resume``).

A sink pauses itself when the dead-letter storm guard fires (most recent answers were the
same dead-letter status: a wrong base URL, a removed API version) or when the receiver
refuses the gateway's credentials; its events stay queued. Resuming is an operator's
decision: ``--reason`` is required and, with ``--by`` (default: the login name), written to
the audit trail. The address and token are found as ``edge status`` finds them.

Exit 0 when the sink was paused and now sends; 1 when it was not paused, is unknown, or
the daemon does not answer or refuses; 2 on bad usage or config.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any
from urllib.parse import quote

from edge.cli.daemon_api import DEFAULT_URL, request, target


def register(sub: Any) -> None:
    p = sub.add_parser("sink", help="act on a sink of the running gateway (resume)")
    ssub = p.add_subparsers(dest="sink_command", metavar="ACTION")
    ssub.required = True

    s = ssub.add_parser("resume", help="let a paused sink send again (audited)")
    s.add_argument("sink_id", metavar="ID", help="the sink's id (see `edge status`)")
    s.add_argument("--reason", required=True, help="why; recorded in the audit trail")
    s.add_argument("--by", metavar="NAME", help="who decided (default: your login name)")
    s.add_argument("-c", "--config", metavar="FILE",
                   help="the gateway's config: API address and token file")
    s.add_argument("--url", help=f"base URL of the gateway's API (default {DEFAULT_URL})")
    s.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    s.set_defaults(handler=cmd_resume)


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def cmd_resume(args: argparse.Namespace) -> int:
    reason = args.reason.strip()
    if not reason:
        print("edge sink resume: --reason must say why", file=sys.stderr)
        return 2
    url, token = target(args, "sink resume")
    body: dict[str, str] = {"reason": reason}
    by = (args.by or "").strip() or _login()
    if by:
        body["by"] = by
    path = f"/sinks/{quote(args.sink_id, safe='')}/resume"
    endpoint = f"{url}{path}"
    resp = request("sink resume", "POST", url, path, token, timeout=args.timeout, json=body)
    if resp is None:
        return 1
    if resp.status_code == 404:
        print(f"edge sink resume: the gateway has no sink {args.sink_id!r} "
              "(see `edge status`)", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"edge sink resume: {endpoint} answered {resp.status_code}: {resp.text[:300]}",
              file=sys.stderr)
        return 1
    try:
        resumed = bool(resp.json().get("resumed"))
    except (ValueError, AttributeError):
        print(f"edge sink resume: {endpoint} answered with something that is not the "
              f"expected JSON object: {resp.text[:300]}", file=sys.stderr)
        return 1
    if not resumed:
        print(f"sink {args.sink_id} is not paused: nothing to resume", file=sys.stderr)
        return 1
    print(f"sink {args.sink_id} resumed" + (f" by {by}" if by else "") + f": {reason}")
    return 0
