"""Helpers shared by CLI verbs: config loading with located errors, event loop runner."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

from edge.errors import ConfigError

EXIT_CONFIG = 2

DEFAULT_CREDENTIALS_DIRECTORY = "/etc/edge-gateway/credentials"
"""``${CREDENTIALS_DIRECTORY}`` in operator commands outside systemd (they read no secret)."""


def load_or_exit(path: str, *, check_files: bool = True) -> Any:
    """Load a config file; on error print every located issue to stderr and exit 2.

    ``check_files=False`` is for operator commands (``edge status``, ``outbox stats``,
    ``dlq list`` ...): they read no secret, so secret files need not exist and
    ``${CREDENTIALS_DIRECTORY}`` (set by systemd for the daemon only) defaults to
    ``DEFAULT_CREDENTIALS_DIRECTORY``.
    """
    from edge.config import load_config

    env: dict[str, str] | None = None
    if not check_files:
        env = dict(os.environ)
        env.setdefault("CREDENTIALS_DIRECTORY", DEFAULT_CREDENTIALS_DIRECTORY)
    try:
        return load_config(path, check_files=check_files, env=env)
    except ConfigError as err:
        config_exit(path, err)


def config_exit(path: str, err: ConfigError) -> NoReturn:
    """Print a config error's located issues to stderr and exit 2."""
    print(f"{path}: invalid configuration", file=sys.stderr)
    for issue in err.issues:
        print(f"  {issue}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG) from err


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where available (``uvloop.run``), plain asyncio otherwise.

    The GIL switch interval drops from 5 ms to 1 ms: the SQLite writer and reader threads
    hand the GIL back and forth with the event loop on every statement, and at 5 ms each
    hand-over could stall a commit (or a network callback) for a whole interval.
    """
    sys.setswitchinterval(0.001)
    # Under load tens of thousands of objects are in flight (MQTT messages, events): the
    # default collector promoted them to the oldest generation and then traversed them all
    # in frequent full passes, half of the ingest time. Young collections stay as frequent
    # as by default (cycles around a sent batch die young: bounded memory), full ones are
    # 10x rarer, and Gateway.start() freezes what lives as long as the process.
    gc.set_threshold(700, 10, 100)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def open_outbox_or_exit(path: str, *, write: bool = False) -> Any:
    """Open the outbox file for an operator command; a state dir or file it cannot open
    (no permission, a folder in its place, not a database) is one line on stderr, exit 2."""
    import sqlite3

    from edge.outbox.dbthread import connect

    try:
        return connect(path, readonly=False, synchronous="FULL") if write else connect(path)
    except (sqlite3.Error, OSError) as err:
        print(f"edge: cannot open the outbox {path}: {err} (check state_dir, the file's "
              "owner and permissions)", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from err
