"""``edge audit verify`` — check the audit trail's hash chain (docs/audit.md).

``-c FILE`` verifies the outbox of a config, ``--db PATH`` an outbox file (one moved aside,
a copy), ``--bundle DIR`` an exported bundle on its own. The outbox is opened read-only: a
running gateway is never blocked. Checkpoint signatures are checked with ``--key-file``, or
with the config's ``audit.checkpoint_key_file`` when it is readable.

Exit 0: "N entries verified from ..."; 1: the first broken link (seq or checkpoint, and
whether it looks edited, deleted or reordered); 2: bad usage, bad config, a file or bundle
that cannot be read or has no chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from edge.cli.common import EXIT_CONFIG, load_or_exit


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="verify the hash-chained audit trail")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    asub.required = True
    s = asub.add_parser("verify", help="walk the chain; exit 1 at the first broken link")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", metavar="FILE", help="the outbox of this config")
    where.add_argument("--db", metavar="PATH", help="an outbox file (e.g. one moved aside)")
    where.add_argument("--bundle", metavar="DIR", help="an exported bundle folder")
    s.add_argument("--key-file", metavar="PATH",
                   help="HMAC key of the checkpoints (default: audit.checkpoint_key_file)")
    s.add_argument("--json", action="store_true", help="machine-readable result")
    s.set_defaults(handler=cmd_verify)


def _fail(message: str) -> int:
    print(f"edge audit verify: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _read_key(path: str) -> bytes:
    from edge.config import read_secret

    secret = read_secret(path)
    if not secret:
        raise OSError(f"{path} is empty")
    return secret.encode()


def cmd_verify(args: argparse.Namespace) -> int:
    from edge.errors import ConfigError
    from edge.outbox import audit, audit_export

    key: bytes | None = None
    notes: list[str] = []
    try:
        if args.key_file:
            key = _read_key(args.key_file)
    except (OSError, ConfigError) as err:
        return _fail(f"cannot read the key file: {err}")
    if args.config:
        cfg = load_or_exit(args.config, check_files=False)
        db = str(Path(cfg.state_dir) / "outbox.db")
        key_file = cfg.audit.checkpoint_key_file
        if key is None and key_file:
            try:
                key = _read_key(key_file)
            except (OSError, ConfigError) as err:
                notes.append(f"signatures not checked: cannot read {key_file} ({err})")
    else:
        db = args.db
    if args.bundle:
        try:
            result = audit_export.verify_bundle(args.bundle, key)
        except audit_export.BundleError as err:
            return _fail(f"cannot read the bundle: {err}")
        what = args.bundle
    else:
        if not Path(db).is_file():
            return _fail(f"no outbox file at {db}")
        try:
            result = _verify_file(db, key, audit)
        except _NoChain as err:
            return _fail(str(err))
        except sqlite3.Error as err:
            return _fail(f"cannot read the outbox {db}: {err}")
        what = db
    result.notes[:0] = notes
    if args.json:
        json.dump({"path": what, **dataclasses.asdict(result)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif result.ok:
        print(f"{what}: {result.summary()}")
    else:
        print(f"{what}: audit chain broken: {result.message} ({result.verified} entries "
              "verified before it)")
    if not args.json:
        for note in result.notes:
            print(f"  note: {note}", file=sys.stderr)
    return 0 if result.ok else 1


class _NoChain(Exception):
    pass


def _verify_file(path: str, key: bytes | None, audit: Any) -> Any:
    from edge.outbox.dbthread import connect

    conn = connect(path, readonly=True)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "audit" not in names:
            raise _NoChain(f"{path} is not an outbox file (no audit table)")
        if "audit_checkpoints" not in names:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            raise _NoChain(f"{path} has no audit chain yet (schema version {version}); the "
                           "gateway chains it when it next opens the file")
        upgrading = conn.execute("SELECT 1 FROM meta WHERE key = 'audit_chain_upgrade'"
                                 ).fetchone()
        if upgrading and not conn.execute("SELECT 1 FROM audit_checkpoints").fetchone():
            raise _NoChain(f"{path}: the gateway is chaining the audit trail of this older "
                           "file (an upgrade in progress or cut short; it resumes at the next "
                           "start)")
        return audit.verify_db(conn, key)
    finally:
        conn.close()
