"""The single writer task with group commit.

Contract:
- Every write to the outbox goes through ``GroupCommitWriter.execute(fn, rows)``; ``fn`` runs
  on the writer thread inside a transaction and the call returns ``fn``'s result only after
  that transaction COMMITted (with the connection's ``synchronous`` setting, FULL by
  default). Callers ack upstream only after it returned.
- Ops are grouped: a transaction closes at ``max_rows`` rows or ``interval_s`` after its
  first op, whichever comes first. Each op runs in its own SAVEPOINT, so an op that raises
  fails alone (consecutive mergeable ops, e.g. submits, run as one call, and one by one if
  that call fails); a storage error (disk full, I/O) rolls the whole transaction back and
  fails every op in it (``OutboxFullError`` for SQLITE_FULL, ``OutboxStorageError`` for a
  corrupt page, an I/O error or any other fault of the file rather than of one op; either
  kind also sets ``storage_fault`` until a later transaction commits).
- Chains: ops given the same ``chain`` (a source's submits) commit in enqueue order. When
  one of them fails, every op of that chain enqueued before the failure was reported fails
  too, unexecuted, with ``OutboxOrderError`` — it would otherwise commit ahead of the
  failed one. Ops enqueued after the report run normally (the caller's re-submits).
- ``close()`` commits what was queued before it and then stops; later calls raise
  ``OutboxClosedError``. The op queue is bounded: producers wait when it is full.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from edge.errors import (
    OutboxClosedError,
    OutboxError,
    OutboxFullError,
    OutboxOrderError,
    OutboxStorageError,
)
from edge.outbox.dbthread import DbThread
from edge.telemetry import Metrics, log_event

__all__ = ["GroupCommitWriter", "is_storage_error"]

log = logging.getLogger(__name__)
T = TypeVar("T")


Merger = Callable[[sqlite3.Connection, list[Any]], list[Any]]


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    rows: int
    future: asyncio.Future[Any] = field(repr=False)
    merge: Merger | None = None  # ops with the same merger in a row run as one call
    payload: Any = None
    chain: str | None = None
    epoch: int = 0  # the chain's failure count when this op was enqueued


_STOP = object()


def _is_full(err: BaseException) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or \
        "database or disk is full" in str(err)


# Result codes that describe the file or the disk, not the statement of one op.
_STORAGE_CODES = frozenset({
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
})
_STORAGE_WORDS = ("disk I/O", "malformed", "not a database", "disk is full", "readonly",
                  "unable to open")


def is_storage_error(err: BaseException) -> bool:
    """A fault of the database file or the disk (every op would fail), not of one op."""
    if not isinstance(err, sqlite3.DatabaseError) or isinstance(
            err, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return False
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _STORAGE_CODES
    return any(w in str(err) for w in _STORAGE_WORDS)


class _ChainBroken(Exception):
    """An earlier op of the same chain failed in this transaction."""


def _in_savepoint(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]
                  ) -> tuple[bool, Any]:
    """Run ``fn`` in a savepoint: (True, result), or (False, error) with its writes undone.
    Storage errors (disk full, I/O) propagate: they fail the whole transaction."""
    conn.execute("SAVEPOINT op")
    try:
        value = fn(conn)
    except sqlite3.DatabaseError as err:
        if is_storage_error(err):
            raise
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return False, err
    except Exception as err:  # noqa: BLE001 - one op's bug must not fail the others
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return False, err
    conn.execute("RELEASE op")
    return True, value


def _call_merger(merge: Merger, payloads: list[Any], conn: sqlite3.Connection) -> list[Any]:
    return merge(conn, payloads)


def _run_transaction(conn: sqlite3.Connection, ops: list[_Op]) -> list[tuple[bool, Any]]:
    results: list[tuple[bool, Any]] = []
    broken: set[str] = set()  # chains with a failed op in this transaction

    def alone(op: _Op) -> tuple[bool, Any]:
        if op.chain is not None and op.chain in broken:
            return False, _ChainBroken(op.chain)
        ok, value = _in_savepoint(conn, op.fn)
        if not ok and op.chain is not None:
            broken.add(op.chain)
        return ok, value

    conn.execute("BEGIN IMMEDIATE")
    try:
        i = 0
        while i < len(ops):
            op = ops[i]
            if op.merge is None:
                results.append(alone(op))
                i += 1
                continue
            # consecutive ops of one kind (e.g. submits of many producers): one call, so
            # one set of statements for the whole group
            j = i
            while j < len(ops) and ops[j].merge is op.merge:
                j += 1
            group = ops[i:j]
            payloads = [o.payload for o in group]
            ok, value = (False, None) if any(o.chain in broken for o in group if o.chain) \
                else _in_savepoint(conn, partial(_call_merger, op.merge, payloads))
            if ok:
                results.extend((True, v) for v in cast(list[Any], value))
            else:  # find the op that fails, keep the others (in order, chains honoured)
                results.extend(alone(o) for o in group)
            i = j
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class GroupCommitWriter:
    def __init__(
        self,
        db: DbThread,
        metrics: Metrics,
        *,
        interval_s: float,
        max_rows: int,
        queue_max: int = 20_000,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._interval_s = interval_s
        self._max_rows = max_rows
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.disk_full_until = 0.0  # monotonic time until which the last SQLITE_FULL holds
        # (wall time, message) of the last storage fault; cleared by the next commit
        self.storage_fault: tuple[float, str] | None = None
        self._chain_epoch: dict[str, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-writer")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def execute(self, fn: Callable[[sqlite3.Connection], T], rows: int = 1) -> T:
        """Run ``fn`` in the next group transaction; return its result after COMMIT."""
        return await self._enqueue(fn, rows)

    async def execute_merged(self, merge: Merger, payload: Any, rows: int = 1, *,
                             chain: str | None = None) -> Any:
        """Like ``execute`` for ops that can be merged: consecutive ops with the same
        ``merge`` run as ``merge(conn, [payload, ...])`` (one result per payload); if that
        call fails, each op runs alone so only the faulty one fails. ``chain``: see the
        module contract."""
        return await self._enqueue(lambda c: merge(c, [payload])[0], rows, merge, payload,
                                   chain)

    async def _enqueue(self, fn: Callable[[sqlite3.Connection], Any], rows: int,
                       merge: Merger | None = None, payload: Any = None,
                       chain: str | None = None) -> Any:
        if self._closing or self._task is None or self._task.done():
            raise OutboxClosedError("the outbox writer is stopped")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        epoch = self._chain_epoch.get(chain, 0) if chain is not None else 0
        await self._queue.put(_Op(fn, rows, fut, merge, payload, chain, epoch))
        return await fut

    def _stale(self, op: _Op) -> bool:
        """Enqueued before a failure of its chain was reported: must not run."""
        return op.chain is not None and op.epoch < self._chain_epoch.get(op.chain, 0)

    def _fail(self, op: _Op, exc: BaseException) -> None:
        """Report a failed op; a chain's failure makes its older queued ops stale."""
        if op.chain is not None and op.epoch >= self._chain_epoch.get(op.chain, 0):
            self._chain_epoch[op.chain] = op.epoch + 1
        if not op.future.done():
            op.future.set_exception(exc)

    async def close(self) -> None:
        """Commit everything queued so far, then stop the writer task."""
        if self._task is None:
            return
        self._closing = True
        if not self._task.done():
            await self._queue.put(_STOP)
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch: list[_Op] = [first]
            rows = first.rows
            deadline = loop.time() + self._interval_s
            while rows < self._max_rows:
                try:
                    op = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        op = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if op is _STOP:
                    stopping = True
                    break
                batch.append(op)
                rows += op.rows
            await self._commit(batch, rows)
        # fail anything that raced in after the stop marker
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if op is not _STOP and not op.future.done():
                op.future.set_exception(OutboxClosedError("the outbox writer is stopped"))

    async def _commit(self, batch: list[_Op], rows: int) -> None:
        stale = [op for op in batch if self._stale(op)]
        if stale:
            for op in stale:
                self._fail(op, OutboxOrderError(
                    f"an earlier write of {op.chain!r} failed; re-submit in order"))
            batch = [op for op in batch if not self._stale(op)]
            if not batch:
                return
        try:
            results = await self._db.run(_run_transaction, batch)
        except sqlite3.Error as err:
            if _is_full(err):
                self.disk_full_until = time.monotonic() + 1.0
                # readiness and the outbox_storage alarm name the disk, not the budget
                self.storage_fault = (time.time(), f"disk full: {err}")
                self._metrics.outbox_write_errors.labels("disk_full").inc()
                log_event(log, logging.ERROR, "outbox write failed: disk full; not acked",
                          rows=rows)
                exc: Exception = OutboxFullError("disk full (SQLITE_FULL); nothing committed")
            elif is_storage_error(err):
                self.storage_fault = (time.time(), str(err))
                self._metrics.outbox_write_errors.labels("storage").inc()
                log_event(log, logging.ERROR, "outbox storage fault: nothing committed, "
                          "not acked; retrying", error=str(err), rows=rows)
                exc = OutboxStorageError(f"outbox storage fault: {err}")
            else:
                self._metrics.outbox_write_errors.labels("sqlite").inc()
                log_event(log, logging.ERROR, "outbox write failed", error=str(err), rows=rows)
                exc = OutboxError(f"outbox write failed: {err}")
            for op in batch:
                self._fail(op, exc)
            return
        except BaseException as err:  # CancelledError: the commit may still finish
            for op in batch:
                self._fail(op, OutboxClosedError(f"writer stopped: {err!r}"))
            raise
        if time.monotonic() >= self.disk_full_until:
            # a commit within the second after SQLITE_FULL may have fit into the file's
            # free pages: the disk is still full for anything that grows the file
            self.storage_fault = None
        self._metrics.outbox_commits.inc()
        self._metrics.outbox_commit_rows.observe(rows)
        for op, (ok, value) in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if ok:
                op.future.set_result(value)
            elif isinstance(value, _ChainBroken):
                self._fail(op, OutboxOrderError(
                    f"an earlier write of {op.chain!r} failed; re-submit in order"))
            else:
                self._fail(op, value)
