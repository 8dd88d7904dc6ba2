"""A sqlite3 connection owned by one worker thread, driven from asyncio.

Why not one aiosqlite call per statement: a transaction of the outbox runs several statements
(events, deliveries, audit, dedupe) and the lease scan walks per-key chains; at ~35 µs per
thread hop that dominates. Here a whole transaction is one Python function executed on the
connection's thread: one hop per transaction, and the event loop never blocks on SQLite.

Contract: ``await db.run(fn, *args)`` calls ``fn(conn, *args)`` on the worker thread and
returns its result (exceptions propagate). Cancelling the awaiting task does not stop a
function already running on the thread (a COMMIT completes). ``close()`` closes the
connection and joins the thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["DbThread", "connect"]

# Compiled statements with many placeholders are large; the outbox uses a few shapes
# (edge.outbox.sqlutil), so a small cache holds them all and bounds the memory.
_CACHED_STATEMENTS = 48


def connect(path: str, *, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """Open the outbox database with the pragmas every connection needs."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False,
            cached_statements=_CACHED_STATEMENTS,
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               cached_statements=_CACHED_STATEMENTS)
    conn.execute("PRAGMA busy_timeout=10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-8000")  # 8 MB page cache per connection: bounded RSS
    return conn


class DbThread:
    def __init__(self, conn_factory: Callable[[], sqlite3.Connection], name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._factory = conn_factory
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, self._factory)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            raise RuntimeError("database connection is not open")
        loop = asyncio.get_running_loop()
        conn = self._conn
        return await loop.run_in_executor(self._executor, lambda: fn(conn, *args))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, conn.close)
            except RuntimeError:  # executor already shut down (interpreter exit)
                conn.close()
        self._executor.shutdown(wait=True)
