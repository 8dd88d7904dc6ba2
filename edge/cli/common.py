"""Helpers shared by CLI verbs: config loading with located errors, event loop runner."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Coroutine
from typing import Any

from edge.errors import ConfigError

EXIT_CONFIG = 2


def load_or_exit(path: str, *, check_files: bool = True) -> Any:
    """Load a config file; on error print every located issue to stderr and exit 2."""
    from edge.config import load_config

    try:
        return load_config(path, check_files=check_files)
    except ConfigError as err:
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
