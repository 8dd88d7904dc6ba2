"""Group-commit writer: merged ops commit together, and a failing one fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge.outbox.dbthread import DbThread, connect
from edge.outbox.writer import GroupCommitWriter
from edge.telemetry import Metrics


def insert_names(conn: sqlite3.Connection, payloads: list[str]) -> list[int]:
    """A merger: one statement for the whole group; a payload 'bad' breaks it."""
    conn.executemany("INSERT INTO t(name) VALUES (?)", [(p,) for p in payloads])
    if "bad" in payloads:
        raise ValueError("bad payload")
    return [len(p) for p in payloads]


@pytest.fixture
async def writer(tmp_path: Path):
    path = str(tmp_path / "w.db")
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t(name TEXT)")
    setup.close()
    db = DbThread(lambda: connect(path), "test-writer")
    await db.open()
    # a long interval: every op queued below lands in one transaction
    metrics = Metrics()
    w = GroupCommitWriter(db, metrics, interval_s=0.2, max_rows=1000)
    w.start()
    try:
        yield w, path, metrics
    finally:
        await w.close()
        await db.close()


async def test_a_failing_merged_op_fails_alone_and_the_others_commit(writer) -> None:
    w, path, metrics = writer
    results = await asyncio.gather(
        *(w.execute_merged(insert_names, name) for name in ("ab", "bad", "cde")),
        return_exceptions=True)
    assert results[0] == 2 and results[2] == 3
    assert isinstance(results[1], ValueError)
    conn = sqlite3.connect(path)
    try:
        names = sorted(r[0] for r in conn.execute("SELECT name FROM t"))
    finally:
        conn.close()
    assert names == ["ab", "cde"]  # the failed op's row was rolled back, the others kept
    assert metrics.outbox_commits._value.get() == 1  # one transaction for all three
