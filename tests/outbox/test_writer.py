"""Group-commit writer: merged ops commit together, and a failing one fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge.errors import OutboxFullError
from edge.outbox.dbthread import DbThread, connect
from edge.outbox.writer import GroupCommitWriter
from edge.telemetry import Metrics
from tests.support import metric


def insert_names(conn: sqlite3.Connection, payloads: list[str]) -> list[int]:
    """A merger: one statement for the whole group; a payload 'bad' breaks it."""
    conn.executemany("INSERT INTO t(name) VALUES (?)", [(p,) for p in payloads])
    if "bad" in payloads:
        raise ValueError("bad payload")
    return [len(p) for p in payloads]


@contextlib.asynccontextmanager
async def started_writer(tmp_path: Path, **options: Any) -> AsyncIterator[
        tuple[GroupCommitWriter, str, Metrics]]:
    """A writer over a one-table database ``t(name)``; closed at the end."""
    path = str(tmp_path / "w.db")
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t(name TEXT)")
    setup.close()
    db = DbThread(lambda: connect(path), "test-writer")
    await db.open()
    metrics = Metrics()
    w = GroupCommitWriter(db, metrics, **options)
    w.start()
    try:
        yield w, path, metrics
    finally:
        await w.close()
        await db.close()


@pytest.fixture
async def writer(tmp_path: Path):
    # a long interval: every op queued below lands in one transaction
    async with started_writer(tmp_path, interval_s=0.2, max_rows=1000) as made:
        yield made


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
    assert metric(metrics.outbox_commits) == 1  # one transaction for all three


def _names(path: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM t ORDER BY rowid")]
    finally:
        conn.close()


async def test_a_chain_never_commits_a_later_op_ahead_of_a_failed_one(writer) -> None:
    """A source's batches b1, b2 are queued; b1 fails: b2 must not commit ahead of it
    (it fails with OutboxOrderError), and re-submitting both in order stores b1, b2."""
    from edge.errors import OutboxOrderError

    w, path, _ = writer
    results = await asyncio.gather(
        w.execute_merged(insert_names, "bad", chain="line1"),
        w.execute_merged(insert_names, "b2", chain="line1"),
        w.execute_merged(insert_names, "other", chain="line2"),
        return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert isinstance(results[1], OutboxOrderError)
    assert results[2] == 5  # another chain is not affected
    assert _names(path) == ["other"]
    await w.execute_merged(insert_names, "b1", chain="line1")
    await w.execute_merged(insert_names, "b2", chain="line1")
    assert _names(path) == ["other", "b1", "b2"]


def insert_or_full(conn: sqlite3.Connection, payloads: list[str]) -> list[int]:
    """A merger whose payload 'full' hits a full disk (the whole transaction fails)."""
    if "full" in payloads:
        raise sqlite3.OperationalError("database or disk is full")
    return insert_names(conn, payloads)


async def test_ops_of_a_chain_queued_before_a_failed_transaction_do_not_commit(
        tmp_path: Path) -> None:
    """The failure is a whole transaction (disk full); an op of the same chain already
    queued for the next transaction fails too instead of committing first; an op queued
    after the failure was reported (the re-submit) commits."""
    from edge.errors import OutboxFullError, OutboxOrderError

    async with started_writer(tmp_path, interval_s=0.0, max_rows=1) as (w, path, _):
        results = await asyncio.gather(
            w.execute_merged(insert_or_full, "full", chain="s"),
            w.execute_merged(insert_or_full, "b2", chain="s"),
            return_exceptions=True)
        assert isinstance(results[0], OutboxFullError)
        assert isinstance(results[1], OutboxOrderError)
        assert _names(path) == []
        await w.execute_merged(insert_or_full, "b1", chain="s")
        await w.execute_merged(insert_or_full, "b2", chain="s")
    assert _names(path) == ["b1", "b2"]


async def test_a_storage_fault_fails_the_whole_transaction_and_is_reported(writer) -> None:
    """A corrupt page or an I/O error is a fault of the file, not of one op: every op of
    the transaction fails with OutboxStorageError (a source does not ack, does not
    quarantine), and the writer reports the fault until a later commit succeeds."""
    from edge.errors import OutboxStorageError

    w, path, _ = writer

    def corrupt(conn: sqlite3.Connection) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    results = await asyncio.gather(w.execute_merged(insert_names, "ab"), w.execute(corrupt),
                                   return_exceptions=True)
    assert all(isinstance(r, OutboxStorageError) for r in results)
    assert _names(path) == []
    assert w.storage_fault is not None and "malformed" in w.storage_fault[1]
    await w.execute_merged(insert_names, "ab")
    assert w.storage_fault is None


async def test_a_small_commit_right_after_a_full_disk_does_not_clear_the_fault(
        tmp_path: Path) -> None:
    """Found by the long disk-full campaign: a small commit can fit into the file's free
    pages while the disk is still full; it used to clear the fault, and /readyz then blamed
    the budget instead of the disk. The fault holds for the disk-full second, and a commit
    after it clears it."""
    async with started_writer(tmp_path, interval_s=0.0, max_rows=1) as (w, _, _):
        with pytest.raises(OutboxFullError):
            await w.execute_merged(insert_or_full, "full", chain="s")
        await w.execute_merged(insert_or_full, "small", chain="other")
        assert w.storage_fault is not None and "disk full" in w.storage_fault[1]
        w.disk_full_until = 0.0  # the second has passed
        await w.execute_merged(insert_or_full, "later", chain="other")
        assert w.storage_fault is None
