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
    # A gateway under load keeps tens of thousands of short-lived objects in flight (MQTT
    # messages, events, leased rows): with the default thresholds the cyclic collector ran
    # full passes so often that it took half of the ingest time. Collections stay on, less
    # often; Gateway.start() also freezes the objects that live as long as the process.
    gc.set_threshold(50_000, 20, 20)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
