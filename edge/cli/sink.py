"""``edge sink resume ID --reason TEXT [--by NAME] [-c FILE | --url URL]`` — let a paused
sink send again, whether the gateway runs or not.

A sink pauses itself when the dead-letter storm guard fires (most recent answers were the
same dead-letter status: a wrong base URL, a removed API version) or when the receiver
refuses the gateway's credentials; its events stay queued. A storm-guard pause is kept in
the outbox and outlives a restart. Resuming is an operator's decision: ``--reason`` is
required and, with ``--by`` (default: the login name), written to the audit trail.

- Gateway running: the command asks it (``POST /sinks/{id}/resume``); the address and
  token are found as ``edge status`` finds them.
- Gateway stopped (``-c FILE`` given and no gateway holds its ``state_dir``): the stored
  storm-guard pause is removed from the outbox file and the resume audited
  (``sink_resumed``, actor ``cli:<user>``) in one transaction, holding the state dir's
  lock meanwhile; the sink sends when the gateway starts. An auth pause is never stored
  (a restart probes the receiver again). A receiver's ``Retry-After`` pause is stored too
  but is not an operator's to lift: it ends at its time, running or not.

Exit 0 when the sink was paused and now sends (or will, when the gateway starts); 1 when
it was not paused, is unknown, or the daemon does not answer or refuses; 2 on bad usage or
config.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edge.cli.common import load_or_exit
from edge.cli.daemon_api import DEFAULT_URL, request, target


def register(sub: Any) -> None:
    p = sub.add_parser("sink", help="act on a sink of the gateway (resume)")
    ssub = p.add_subparsers(dest="sink_command", metavar="ACTION")
    ssub.required = True

    s = ssub.add_parser("resume", help="let a paused sink send again (audited)")
    s.add_argument("sink_id", metavar="ID", help="the sink's id (see `edge status`)")
    s.add_argument("--reason", required=True, help="why; recorded in the audit trail")
    s.add_argument("--by", metavar="NAME", help="who decided (default: your login name)")
    s.add_argument("-c", "--config", metavar="FILE",
                   help="the gateway's config: API address and token file; with it, "
                        "a stopped gateway's sink is resumed in its outbox file")
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
    by = (args.by or "").strip() or _login()
    if args.config:
        cfg = load_or_exit(args.config, check_files=False)
        with _gateway_stopped(cfg.state_dir) as stopped:
            if stopped:
                return _resume_stopped(args, cfg, reason, (args.by or "").strip())
        if not cfg.api.enabled and not args.url:
            print(f"edge sink resume: the gateway runs with its local API off "
                  f"(api.enabled: false in {args.config}): stop it, run this command again "
                  "(it then resumes the sink in the outbox file), and start it",
                  file=sys.stderr)
            return 1
    url, token = target(args, "sink resume")
    body: dict[str, str] = {"reason": reason}
    if by:
        body["by"] = by
    path = f"/sinks/{quote(args.sink_id, safe='')}/resume"
    endpoint = f"{url}{path}"
    resp = request("sink resume", "POST", url, path, token, timeout=args.timeout, json=body)
    if resp is None:
        if not args.config:
            print("edge sink resume: to resume a sink of a stopped gateway, give its config: "
                  f"edge sink resume {args.sink_id} -c FILE --reason ...", file=sys.stderr)
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


@contextlib.contextmanager
def _gateway_stopped(state_dir: str) -> Iterator[bool]:
    """True while this process holds the state dir's lock (no gateway runs on it, and none
    can start until the block ends); False when a gateway holds it or the lock cannot be
    checked (then the running gateway is asked)."""
    path = Path(state_dir)
    if not path.is_dir():
        yield True  # no gateway ever ran here: the outbox check says so
        return
    try:
        # read-only is enough for flock, and works for an operator who may not write it
        fd = os.open(path / "edge.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path / "edge.lock", os.O_RDONLY)
        except OSError:
            yield False
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by the running gateway
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _resume_stopped(args: argparse.Namespace, cfg: Any, reason: str, by: str) -> int:
    """Lift the stored storm-guard pause in the outbox file of a stopped gateway."""
    from edge.cli.outbox import actor, open_db
    from edge.outbox import pauses, queries
    from edge.timefmt import utc_iso

    who = f"{actor()} by {by}" if by else actor()
    conn = None
    try:
        conn = open_db(cfg, write=True)
        with queries.transaction(conn):
            lifted = pauses.resume_stopped(conn, args.sink_id, actor=who, reason=reason)
            left = pauses.load_pauses(conn).get(args.sink_id, {})
    except sqlite3.Error as err:
        print(f"edge sink resume: cannot write the outbox of the stopped gateway "
              f"({cfg.state_dir}): {err} (run it as a user that may write outbox.db)",
              file=sys.stderr)
        return 1
    finally:
        if conn is not None:
            conn.close()
    if lifted is None:
        if args.sink_id not in {s.id for s in cfg.sinks}:
            print(f"edge sink resume: {args.config} has no sink {args.sink_id!r} "
                  "(see its sinks)", file=sys.stderr)
            return 1
        note = ""
        if left.get("retry_after"):
            until = pauses.retry_after_until(left["retry_after"])
            note = (f"; it waits for its receiver's Retry-After until about {utc_iso(until)} "
                    "after the gateway starts")
        print(f"sink {args.sink_id} is not paused: nothing to resume (the gateway is "
              f"stopped){note}", file=sys.stderr)
        return 1
    since = lifted.get("since")
    print(f"sink {args.sink_id} resumed" + (f" by {by}" if by else "") + f": {reason} "
          "(the gateway is stopped; the sink sends when it starts"
          + (f"; it was paused since {utc_iso(float(since))}" if isinstance(since, int | float)
             else "") + ")")
    return 0
