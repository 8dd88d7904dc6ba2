"""The durable outbox: the one place events are stored between sources and sinks.

Contract (DESIGN invariants 1–8):
- ``submit`` returns only after COMMIT; a redelivered record (same source + dedupe key,
  see ``Submission``) returns the first copy's id and stores nothing new. ``chain`` keeps a
  source's storage order equal to its arrival order (``edge.outbox.writer``).
- Identities are never reused: every event takes a seq above any seq ever given, dead
  letters have AUTOINCREMENT ids, so a lease completing late touches only its own rows.
- One delivery row per (event, sink whose routes accept the type). A row leaves only by
  ``complete`` (delivered / dead-lettered), by the ``low``-class expiry policy, or by an
  operator action — each counted and audited in the same transaction.
- ``lease`` hands a forwarder deliverable rows (priority, per-key FIFO, parked keys,
  live-first, see ``edge.outbox.lease``) and remembers them as in flight in memory only:
  after a crash nothing is stuck; every row is simply deliverable again (same event id →
  same Idempotency-Key). Expiry never takes a row in flight.
- When recording a lease's outcomes fails, its rows are kept from a new lease until the
  backoff they were given (a retry is never early, even when ``next_at`` was not saved).
- Disk budget: alarm, then give up bookkeeping (audit of finished events, the oldest
  dedupe keys and quarantine records), then expire the oldest ``low`` rows, then refuse
  new events with ``OutboxFullError`` (backpressure) while only protected rows remain.
- A storage fault at run time (corrupt page, I/O error) fails the write with
  ``OutboxStorageError`` and raises the ``outbox_storage`` alarm; ``storage_fault`` says
  why (readiness fails) until a later write commits.
- At open, a cheap integrity check (``edge.outbox.integrity``: header, schema, each
  table's root); a corrupt file is moved aside and a fresh one started, with an alarm in
  ``alarms`` (never a crash loop). The full check runs beside intake; its corrupt verdict
  calls ``fail_integrity``: from then on every write raises ``OutboxStorageError`` and
  ``lease`` returns nothing (nothing more is acked from or written to that file).
- Sink pauses that outlive the process (``edge.outbox.pauses``): ``sink_paused`` stores a
  storm-guard pause with its audit row, ``sink_resumed`` removes it with its audit row,
  ``complete`` stores a Retry-After end with the outcomes that carried it. ``open`` reads
  them into ``stored_pauses`` for the forwarders.
- Lot state (``edge.outbox.lots``): a submission's ``quality`` changes are written in the
  transaction that stores it; ``quality`` (``edge.quality.state.QualityState``) holds the
  committed rows, read at ``open`` and updated only after a COMMIT. ``write_quality``
  applies changes without events (the rules' catch-up). Maintenance forgets released and
  rejected lots after ``lot_retention_days``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from edge.components import OutcomeKind, StoredEvent, Submission
from edge.config import OutboxConfig, read_secret
from edge.errors import (
    ConfigError,
    OutboxClosedError,
    OutboxFullError,
    OutboxOpenError,
    OutboxStorageError,
)
from edge.events import Event, EventClass
from edge.outbox import audit, audit_export, lots, pauses, queries
from edge.outbox.budget import Budget, BudgetState
from edge.outbox.dbthread import DbThread, connect
from edge.outbox.integrity import EarlyCheck, open_checked, salvage_hint
from edge.outbox.lease import scan_lease
from edge.outbox.queries import Resolution
from edge.outbox.writer import GroupCommitWriter, Merger
from edge.quality.state import Change, QualityState
from edge.retry import steady_time
from edge.telemetry import Metrics, log_event
from edge.timefmt import utc_iso

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

Router = Callable[[Event], list[str]]
_CLASSES = tuple(EventClass)  # index = stored class number


@dataclass
class _Alarm:
    code: str
    message: str
    since: float = field(default_factory=time.time)


AUDIT_CHECKPOINTS_KEPT = 100
"""More audit checkpoints than this are replaced by one (a prune adds one each time)."""


class Outbox:
    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        config: OutboxConfig | None = None,
        metrics: Metrics | None = None,
        *,
        router: Router | None = None,
        filename: str = "outbox.db",
        maintenance_interval_s: float = 1.0,
        early_check: EarlyCheck | None = None,
        clock: Callable[[], float] = steady_time,
        lot_retention_days: float = 90.0,
    ) -> None:
        self.early_check = early_check
        # wall clock of the forwarding decisions (due retries, resend holds); the
        # forwarder's ``next_at`` values come from the same kind of clock
        self.clock = clock
        self.config = config or OutboxConfig()
        self.metrics = metrics or Metrics()
        self.path = str(Path(state_dir) / filename)
        self.router: Router = router or (lambda event: [])
        self._writer: GroupCommitWriter | None = None
        self._wdb: DbThread | None = None
        self._rdb: DbThread | None = None
        self._inflight: dict[str, set[int]] = {}
        # Guards the in-flight sets and ``_gone`` between the loop thread (lease, release)
        # and the writer thread (expiry decides there, inside its transaction).
        self._guard = threading.Lock()
        self._gone: set[int] = set()  # expired seqs a racing lease read may still return
        self._gone_order: deque[int] = deque()
        self._not_before: dict[int, float] = {}  # seq → earliest resend (outcome unsaved)
        self._horizons: dict[str, int] = {}  # source → redelivery horizon (messages)
        self._prune_log: dict[str, tuple[float, int]] = {}  # table → (last line, since)
        self._new_rows: dict[str, asyncio.Event] = {}
        self._lease_locks: dict[str, asyncio.Lock] = {}
        self._quarantine_log: dict[tuple[str, str], tuple[float, int]] = {}
        self._alarms: dict[str, _Alarm] = {}
        self._maintenance: asyncio.Task[None] | None = None
        self._stop_maintenance = asyncio.Event()
        self._maintenance_interval_s = maintenance_interval_s
        self._wal_limit = 64 << 20
        self.budget = Budget(self.config, self.metrics)
        self._accepting = asyncio.Event()
        self._accepting.set()
        self._closed = True
        # sink → the pauses stored by the last run (``edge.outbox.pauses``), read at open
        self.stored_pauses: dict[str, dict[str, Any]] = {}
        # committed lot states and CAPA counts (read at open, updated after each COMMIT)
        self.quality = QualityState()
        # never shorter than the dedupe window: a lot forgotten and seen again starts at
        # episode 1, whose keys must have left the dedupe table by then
        self.lot_retention_s = max(lot_retention_days * 86400.0, self.config.dedupe_window_s)
        # HMAC key of audit checkpoints (``audit.checkpoint_key_file``), read at open
        self._checkpoint_key: bytes | None = None
        self._corrupt: str | None = None  # the integrity check's verdict while open
        # delivered rows marked done and not swept yet (about: the file is the truth)
        self._unswept = 0
        # delivered rows recorded so far: a sweep keeps counting those recorded while it
        # ran (its snapshot may not hold them), or they would wait for a full sweep
        self._recorded = 0
        self._last_completion = 0.0  # monotonic time of the last delivery recorded
        self._sweeping: asyncio.Task[None] | None = None
        self._sweep_more = True  # the last sweep stopped at a limit (or none ran yet)
        # delivered events may be left behind the low-water mark (``sweep`` finds them)
        self._orphans = True
        self._orphan_cursor = 0  # the rolling orphan sweep's position (seq), -1: done
        self._last_full_sweep = -1e9  # monotonic time of the last full sweep
        self._last_orphan_window = -1e9  # ... and of the last window of the rolling one

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        quarantined = await asyncio.to_thread(open_checked, self.path, self.early_check)
        if quarantined:
            self._alarm(
                "outbox_corrupt",
                f"the outbox file failed its integrity check and was moved to {quarantined}; "
                "a fresh outbox was started (the old file is kept for forensics); "
                + salvage_hint(quarantined),
            )
        key_file = self.config.audit.checkpoint_key_file
        if key_file:
            secret = await asyncio.to_thread(read_secret, key_file)
            self._checkpoint_key = secret.encode() if secret else None
        sync = self.config.synchronous.upper()
        self._wdb = DbThread(lambda: connect(self.path, synchronous=sync), "outbox-writer")
        try:
            await self._wdb.open()
            await self._wdb.run(queries.ensure_schema)
        except sqlite3.Error as err:  # locked, busy, no permission: not corruption
            await self._wdb.close()
            self._wdb = None
            raise OutboxOpenError(f"cannot open the outbox file {self.path}: {err}; the "
                                  "file was left as it is (check locks and permissions)"
                                  ) from err
        # The WAL counts against the budget: checkpoint and truncate it at a tenth of the
        # budget (SQLite's defaults, 4 MB and no size limit, suit multi-GB budgets only).
        # And at a quarter of the file system's free space: on a disk smaller than the
        # budget the WAL, never reaching its limit, grew into all free space, and once the
        # disk was full no checkpoint could fold it back (found by the long disk-full run).
        wal_limit = self._wal_limit = int(min(64 << 20, max(64 << 10, min(
            self.budget.budget_bytes // 10, _free_bytes(self.path) // 4))))
        await self._wdb.run(lambda c: queries.set_wal_limits(c, wal_limit))
        self.stored_pauses = await self._wdb.run(_restore_pauses, self.clock())
        self._unswept = await self._wdb.run(queries.pending_sweep)
        lot_rows, capa_rows = await self._wdb.run(lots.load_state)
        self.quality = QualityState()
        self.quality.commit(lot_rows, capa_rows)
        self._rdb = DbThread(lambda: connect(self.path, synchronous=sync), "outbox-reader")
        await self._rdb.open()
        self._writer = GroupCommitWriter(
            self._wdb,
            self.metrics,
            interval_s=self.config.commit_interval_ms / 1000,
            max_rows=self.config.commit_max_rows,
        )
        self._writer.start()
        self._closed = False
        if quarantined:
            await self._write(
                lambda c: audit.insert_audit(
                    c, [audit.audit_row("outbox_quarantined", reason="integrity check failed",
                                        detail={"moved_to": quarantined})]
                )
            )
        await self._check_budget()
        self._maintenance = asyncio.create_task(self._maintain(), name="outbox-maintenance")

    async def close(self) -> None:
        """Commit what is queued, stop maintenance, close both connections."""
        if self._closed:
            return
        self._closed = True
        self._accepting.set()  # wake waiters; they will see OutboxClosedError
        if self._maintenance is not None:
            # Let a step in progress finish rather than cancel it: a cancelled await on the
            # writer does not undo its commit, so the rows an expiry or prune removed would
            # go uncounted in the metrics and alarms.
            self._stop_maintenance.set()
            done, _ = await asyncio.wait({self._maintenance}, timeout=30.0)
            if not done:
                self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        if self._sweeping is not None:
            # a sweep is one transaction: let it commit (what it did not reach stays
            # marked and is swept after the next start)
            with contextlib.suppress(Exception):
                await self._sweeping
        if self._writer is not None:
            await self._writer.close()
        for db in (self._rdb, self._wdb):
            if db is not None:
                await db.close()

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open_writer(self) -> GroupCommitWriter:
        if self._writer is None or self._closed:
            raise OutboxClosedError("the outbox is closed")
        return self._writer

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], rows: int = 1) -> Any:
        self._refuse_if_corrupt()
        return await self._open_writer().execute(fn, rows)

    async def _write_merged(self, merge: Merger, payload: Any, rows: int,
                            chain: str | None = None) -> Any:
        self._refuse_if_corrupt()
        return await self._open_writer().execute_merged(merge, payload, rows, chain=chain)

    def fail_integrity(self, problem: str) -> None:
        """The file was found corrupt while open: refuse every write (``OutboxStorageError``)
        and lease nothing until a restart moves it aside."""
        self._corrupt = problem

    def _refuse_if_corrupt(self) -> None:
        if self._corrupt is not None:
            self.metrics.outbox_write_errors.labels("corrupt").inc()
            raise OutboxStorageError(f"the outbox file is corrupt ({self._corrupt[:200]}): "
                                     "not writing; a restart moves it aside")

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a read-only query function on the reader thread."""
        if self._rdb is None or self._closed:
            raise OutboxClosedError("the outbox is closed")
        return await self._rdb.run(fn, *args)

    # ------------------------------------------------------------------ ingest

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set() and time.monotonic() >= self._disk_full_until()

    def _disk_full_until(self) -> float:
        return self._writer.disk_full_until if self._writer else 0.0

    async def wait_accepting(self) -> None:
        while not self._closed:
            await self._accepting.wait()
            delay = self._disk_full_until() - time.monotonic()
            if delay <= 0:
                return
            await asyncio.sleep(delay)
        raise OutboxClosedError("the outbox is closed")

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        """Store events durably; return their ids after COMMIT (see module contract)."""
        if self._closed:
            raise OutboxClosedError("the outbox is closed")
        if not self.accepting:
            raise OutboxFullError("the outbox budget is exhausted by protected events")
        if not items:
            return []
        prepared: list[queries.Prepared] = []
        for item in items:
            ev = item.event
            prepared.append((item, self.router(ev), ev.to_json()))
            if item.redelivery_horizon > self._horizons.get(ev.source, 0):
                self._horizons[ev.source] = item.redelivery_horizon
        result: queries.SubmitResult = await self._write_merged(
            queries.insert_event_batches, (prepared, self.config.dedupe_window_s),
            rows=len(items), chain=chain)
        for sink in {s for _, sinks, _ in prepared for s in sinks}:
            self.new_rows(sink).set()
        if result.quality is not None:
            self.quality.commit(result.quality.lots, result.quality.capa)
        for source, n in result.stored_by_source.items():
            self.metrics.events_received.labels(source).inc(n)
        for source, n in result.duplicates_by_source.items():
            self.metrics.events_deduplicated.labels(source).inc(n)
        for type_, n in result.unrouted_by_type.items():
            self.metrics.events_unrouted.labels(type_).inc(n)
            log_event(log, logging.WARNING, "event not stored: no sink has a route for its type",
                      type=type_, count=n)
        return result.ids

    async def quarantine(
        self, source: str, reason: str, raw: bytes, meta: dict[str, Any] | None = None,
        detail: str = "",
    ) -> None:
        """Keep an unusable inbound record with its reason (committed before returning)."""
        row = (time.time(), source, reason, detail or None, raw,
               orjson.dumps(meta, default=str).decode() if meta else None)
        await self._write(lambda c: queries.insert_quarantine(c, row, audited=True))
        self.metrics.events_quarantined.labels(source, reason).inc()
        # one line per (source, reason) and 10 s, so a poison flood cannot flood the log
        now = time.monotonic()
        key = (source, reason)
        last, suppressed = self._quarantine_log.get(key, (0.0, 0))
        if now - last >= 10.0:
            log_event(log, logging.WARNING, "inbound record quarantined", source=source,
                      reason=reason, detail=detail[:200], bytes=len(raw),
                      more_since_last_line=suppressed)
            self._quarantine_log[key] = (now, 0)
        else:
            self._quarantine_log[key] = (last, suppressed + 1)

    async def write_quality(self, changes: Sequence[Change]) -> lots.Applied:
        """Apply lot / CAPA changes that no event carries (committed before returning);
        the cache takes the rows after the COMMIT."""
        applied: lots.Applied = await self._write(
            lambda c: lots.apply_changes(c, list(changes)), rows=len(changes))
        self.quality.commit(applied.lots, applied.capa)
        return applied

    async def audit(self, state: str, *, source: str | None = None, reason: str | None = None,
                    detail: dict[str, Any] | None = None, actor: str = "gateway") -> None:
        """Record a component-level state change (gap, reconnect, corrupt file)."""
        d = dict(detail or {})
        if source:
            d["source"] = source
        row = audit.audit_row(state, actor=actor, reason=reason, detail=d)
        await self._write(lambda c: audit.insert_audit(c, [row]))

    async def sink_paused(self, sink: str, *, reason: str, detail: dict[str, Any],
                          keep: dict[str, Any] | None = None) -> None:
        """Audit a sink's pause (``sink_paused``); ``keep``: the pause to store with it, in
        the same transaction, so it survives a restart (``edge.outbox.pauses``)."""
        row = audit.audit_row("sink_paused", reason=reason, detail=detail)

        def write(c: sqlite3.Connection) -> None:
            audit.insert_audit(c, [row])
            if keep is not None:
                pauses.store_pause(c, sink, keep)

        await self._write(write)

    async def sink_resumed(self, sink: str, *, actor: str, reason: str,
                           detail: dict[str, Any]) -> None:
        """Audit an operator's resume (``sink_resumed``) and remove the sink's stored pause
        in the same transaction: once this returns, a restart no longer pauses the sink."""
        row = audit.audit_row("sink_resumed", actor=actor, reason=reason, detail=detail)

        def write(c: sqlite3.Connection) -> None:
            audit.insert_audit(c, [row])
            pauses.clear_pause(c, sink)

        await self._write(write)

    # ------------------------------------------------------------------ forwarding

    def new_rows(self, sink: str) -> asyncio.Event:
        """Set after a commit added rows for ``sink``; the forwarder clears it."""
        return self._new_rows.setdefault(sink, asyncio.Event())

    def inflight(self, sink: str) -> set[int]:
        return self._inflight.setdefault(sink, set())

    async def lease(self, sink: str, limit: int, *, live_limit: int = 0, park: bool = True
                    ) -> list[StoredEvent]:
        """Deliverable rows for ``sink`` (see edge.outbox.lease), marked in flight.

        Leases of one sink run one at a time, each with a snapshot of the in-flight set
        taken here on the loop thread: concurrent lanes never pick the same rows.
        ``park=False`` (the sink's ``on_dead_letter: continue``) lets the later events of a
        dead letter's key flow on.
        """
        if self._corrupt is not None:
            return []  # nothing is sent from a file found corrupt (a restart salvages it)
        inflight = self.inflight(sink)
        lock = self._lease_locks.setdefault(sink, asyncio.Lock())
        async with lock:
            with self._guard:
                snapshot = frozenset(inflight)
            now = self.clock()
            not_before = self._due_not_before(now)
            rows = await self.read(
                lambda c: scan_lease(c, sink, limit, live_limit=live_limit, inflight=snapshot,
                                     now=now, park=park, not_before=not_before)
            )
            with self._guard:
                rows = [r for r in rows if r.seq not in self._gone]
                inflight.update(r.seq for r in rows)
        return [
            StoredEvent(r.seq, r.event_id, r.type, _CLASSES[r.event_class], r.ordering_key,
                        r.attempts, r.body, r.sha256, r.received_at)
            for r in rows
        ]

    def release(self, sink: str, seqs: Sequence[int]) -> None:
        """Forget in-flight marks without changing rows (never attempted)."""
        inflight = self.inflight(sink)
        with self._guard:
            for seq in seqs:
                inflight.discard(seq)

    def _due_not_before(self, now: float) -> dict[int, float]:
        """The resend holds still in force (past ones are forgotten)."""
        if self._not_before:
            self._not_before = {s: t for s, t in self._not_before.items() if t > now}
        return dict(self._not_before)

    async def complete(self, sink: str, resolutions: Sequence[Resolution], *,
                       retry_after: tuple[float, float] | None = None) -> None:
        """Apply delivery results in one transaction (ack, retry, dead-letter, audit).

        ``retry_after``: the sink's Retry-After pause as (end, seconds the receiver asked
        for), stored in the same transaction (or removed once its end has passed; see
        ``edge.outbox.pauses.keep_retry_after``).

        If that transaction fails, the rows stay queued as they were and are resent, but
        never before the backoff their outcome asked for (at least one second): the
        failure is re-raised after the rows are released with that hold.
        """
        if not resolutions:
            return
        res = list(resolutions)
        now = self.clock()

        def write(c: sqlite3.Connection) -> None:
            queries.apply_resolutions(c, sink, res)
            if retry_after is not None:
                pauses.keep_retry_after(c, sink, *retry_after, now=now)

        try:
            await self._write(write, rows=len(res))
        except BaseException:
            hold = self.clock() + 1.0
            for r in res:
                if r.attempted or r.next_at:
                    self._not_before[r.seq] = max(hold, r.next_at)
            raise
        finally:
            self.release(sink, [r.seq for r in res])
        delivered = 0
        for r in res:
            if r.kind is OutcomeKind.delivered or r.kind is OutcomeKind.duplicate:
                delivered += 1
                self.metrics.events_delivered.labels(sink).inc()
                if r.kind is OutcomeKind.duplicate:
                    self.metrics.events_duplicate.labels(sink).inc()
            elif r.kind is OutcomeKind.dead_letter:
                self.metrics.events_dead_lettered.labels(sink).inc()
                # the forwarder logs it, with the correlation id, once the commit is done
        if delivered:
            self._orphans = True
            self._unswept += delivered
            self._recorded += delivered
            self._last_completion = time.monotonic()
            if self._unswept >= queries.SWEEP_ROWS:
                self._start_sweep()

    # ------------------------------------------------------------------ deferred delete

    def _start_sweep(self) -> None:
        """Sweep delivered rows in the background (one sweep at a time)."""
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = asyncio.create_task(self._sweep_once(), name="outbox-sweep")

    async def _sweep_once(self) -> None:
        recorded = self._recorded
        try:
            swept: queries.Swept = await self._write(queries.sweep_delivered)
        except (OutboxClosedError, OutboxStorageError):
            return
        except (sqlite3.Error, OSError) as err:
            log_event(log, logging.ERROR, "sweeping delivered rows failed", error=str(err))
            return
        late = self._recorded - recorded
        self._unswept = max(late, self._unswept - swept.rows) if swept.more else late
        self._sweep_more = swept.more

    async def _sweep_orphan_window(self) -> None:
        """One window of the rolling sweep of delivered events left behind the low-water
        mark (a parked lot's old rows hold the mark back): every event is looked at once
        per pass, a window every 10 s at most (a pass over 1M events: ~8 min; disk pressure
        sweeps everything at once)."""
        after = max(0, self._orphan_cursor)
        self._last_orphan_window = time.monotonic()
        _, nxt = await self._write(partial(queries.sweep_orphans, after=after))
        self._orphan_cursor = nxt
        if nxt < 0:
            self._orphan_cursor = 0
            self._orphans = self._unswept > 0 or self._sweep_more

    async def sweep(self) -> int:
        """Sweep every delivered row and every event that left the outbox now (disk
        pressure, tests); returns the delivery rows deleted."""
        if self._sweeping is not None:
            with contextlib.suppress(Exception):
                await self._sweeping
        recorded = self._recorded
        total = 0
        while True:
            swept: queries.Swept = await self._write(queries.sweep_delivered)
            total += swept.rows
            if not swept.more:
                break
        after = 0
        while after >= 0:
            _, after = await self._write(partial(queries.sweep_orphans, after=after))
        self._unswept = self._recorded - recorded  # recorded while this ran
        self._sweep_more = False
        self._orphans = self._unswept > 0
        self._last_full_sweep = time.monotonic()
        return total

    # ------------------------------------------------------------------ budget and health

    def _alarm(self, code: str, message: str) -> None:
        if code not in self._alarms:
            self._alarms[code] = _Alarm(code, message)
            log_event(log, logging.ERROR if code == "outbox_corrupt" else logging.WARNING,
                      message, alarm=code)

    def _clear(self, code: str) -> None:
        if self._alarms.pop(code, None) is not None:
            log_event(log, logging.INFO, "alarm cleared", alarm=code)

    @property
    def alarms(self) -> list[dict[str, Any]]:
        return [
            {"code": a.code, "message": a.message, "since": utc_iso(a.since)}
            for a in self._alarms.values()
        ]

    async def _maintain(self) -> None:
        last_prune = last_export = time.monotonic()
        export = self.config.audit.export
        while True:
            # near the budget, look five times as often: a fast stream fills a small
            # budget's headroom within one ordinary interval
            near = self.budget.last_percent >= self.budget.bookkeeping_percent
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_maintenance.wait(),
                                       self._maintenance_interval_s / (5 if near else 1))
            if self._stop_maintenance.is_set():
                return
            if self._corrupt is not None:
                continue  # nothing is written to a file found corrupt
            try:
                await self.prune_redelivery_horizon()
                if self._sweep_more or (self._unswept and (
                        self._unswept >= queries.SWEEP_ROWS // 4
                        or time.monotonic() - self._last_completion > 2.0)):
                    # steady traffic, a pause in deliveries, or events left behind the
                    # low-water mark: no need to wait for more
                    await self._sweep_once()
                if self._orphans and time.monotonic() - self._last_orphan_window > 10.0:
                    await self._sweep_orphan_window()
                await self._check_budget()
                self._check_storage()
                if time.monotonic() - last_prune > 60:
                    last_prune = last_export = time.monotonic()
                    await self.prune()
                elif export is not None and time.monotonic() - last_export > export.interval_s:
                    last_export = time.monotonic()
                    await self.export_audit()
            except OutboxClosedError:
                return
            except (sqlite3.Error, OSError) as err:
                log_event(log, logging.ERROR, "outbox maintenance failed", error=str(err))

    async def _observe_budget(self) -> tuple[int, BudgetState]:
        """Measure the file: (bytes expiry can act on, the budget's verdict)."""
        db, wal = await self.read(queries.used_parts, self.path)
        used = db + min(wal, self._wal_limit)
        return used, self.budget.observe(used, total=db + wal, live=db)

    async def _check_budget(self) -> None:
        used, state = await self._observe_budget()
        if (self._unswept or self._orphans) and (
                state.expire_needed or state.alarm or not self._accepting.is_set()
                or state.percent >= self.budget.bookkeeping_percent) and (
                state.expire_needed or time.monotonic() - self._last_full_sweep > 30.0):
            # delivered rows waiting for the sweep are the cheapest space to free: before
            # any history is pruned or an event expired or refused
            await self.sweep()
            used, state = await self._observe_budget()
        if (state.expire_needed or not self._accepting.is_set()) and self._wdb is not None:
            # The WAL counts against the budget and can outgrow its limit while readers
            # hold snapshots; and refusing new events means few commits, so it would stay
            # at its high-water mark and keep us "full" after everything drained: fold it
            # back before deciding to expire or refuse anything.
            await self._wdb.run(queries.wal_checkpoint)
            used, state = await self._observe_budget()
        if state.percent >= self.budget.bookkeeping_percent:
            # Bookkeeping first and early (DESIGN invariant 2: with the sinks up, a small
            # budget carries an endless stream): the oldest history of events that already
            # left the outbox, then the oldest dedupe keys and quarantine records, down to
            # half the budget — so no event is expired or refused for the sake of history,
            # and a fast stream does not outrun the next check.
            pruned = await self._prune_audit_for_space(self.budget.bookkeeping_to_free(used))
            if pruned and self._wdb is not None:
                # the deletes went to the WAL first: fold it back, then measure
                await self._wdb.run(queries.wal_checkpoint)
                used, state = await self._observe_budget()
            if state.percent >= self.budget.bookkeeping_percent:
                pruned = await self._prune_bookkeeping_for_space(
                    self.budget.bookkeeping_to_free(used))
                if pruned and self._wdb is not None:
                    await self._wdb.run(queries.wal_checkpoint)
                    used, state = await self._observe_budget()
        if state.expire_needed:
            expired = await self.expire_low(self.budget.bytes_to_free(used))
            if expired:
                used, state = await self._observe_budget()
        if state.alarm:
            self._alarm("outbox_budget", state.message)
        else:
            self._clear("outbox_budget")
        if state.full:
            if self._accepting.is_set():
                self._accepting.clear()
                self.metrics.outbox_backpressure.set(1)
                log_event(log, logging.ERROR,
                          "outbox full of protected events: refusing new events (backpressure)",
                          used_bytes=used, budget_bytes=self.budget.budget_bytes)
        elif not self._accepting.is_set() and state.may_resume:
            self._accepting.set()
            self.metrics.outbox_backpressure.set(0)
            log_event(log, logging.INFO, "outbox accepting events again", used_bytes=used)

    def _claim_for_expiry(self, seqs: list[int], limit: int) -> list[int]:
        """Writer thread, inside the expiry transaction: up to ``limit`` seqs not in flight
        now, marked gone so a lease read that started before this commit cannot hand them
        out."""
        with self._guard:
            busy = set().union(*self._inflight.values()) if self._inflight else set()
            free = [s for s in seqs if s not in busy][:limit]
            self._gone.update(free)
            self._gone_order.extend(free)
            while len(self._gone_order) > 200_000:  # seqs never repeat: old marks are moot
                self._gone.discard(self._gone_order.popleft())
        return free

    def _claim_into(self, claimed: list[int], seqs: list[int], limit: int) -> list[int]:
        claimed.extend(self._claim_for_expiry(seqs, limit))
        return claimed

    def _unclaim(self, seqs: Sequence[int]) -> None:
        with self._guard:
            self._gone.difference_update(seqs)

    async def expire_low(self, bytes_to_free: int) -> int:
        """Expire the oldest ``low`` rows (never higher classes, never a row in flight),
        counted and audited."""
        total = 0
        # estimate rows from the average event size; at least one chunk
        chunk = max(100, min(5000, bytes_to_free // 512))
        while True:
            claimed: list[int] = []
            claim = partial(self._claim_into, claimed)
            try:
                n = await self._write(partial(queries.expire_low, limit=chunk, claim=claim),
                                      rows=chunk)
            except BaseException:
                self._unclaim(claimed)  # rolled back: the rows are still there
                raise
            total += n
            if n:
                self.metrics.events_expired.labels("low").inc(n)
            if n < chunk or total * 512 >= bytes_to_free:
                break
        if total:
            log_event(log, logging.WARNING, "expired oldest low-class events (disk budget)",
                      count=total)
        return total

    async def _prune_audit_for_space(self, bytes_to_free: int) -> int:
        if (self._unswept or self._orphans) and time.monotonic() - self._last_full_sweep > 30:
            await self.sweep()  # a delivered event's history may go only once it left
        chunk = max(500, min(20_000, bytes_to_free // 150))
        exporting = self.config.audit.export is not None
        key = self._checkpoint_key
        pruned: queries.AuditPruned = await self._write(lambda c: queries.prune_finished_audit(
            c, chunk, export_configured=exporting, checkpoint_key=key))
        if pruned.removed:
            self.metrics.audit_pruned.labels("budget").inc(pruned.removed)
            self._alarm("audit_pruned", "disk budget: oldest audit history of delivered events "
                        "was removed early")
            self._log_prune("audit", pruned.removed, oldest_kept=pruned.oldest_kept)
            await self._compact_audit_checkpoints()
        if pruned.unexported:
            self._alarm("audit_pruned_unexported", "disk budget: audit entries were pruned "
                        "before the export shipped them (see the audit_pruned_unexported "
                        "entries and checkpoints)")
            log_event(log, logging.ERROR, "disk budget: pruned audit entries not exported yet",
                      count=pruned.unexported)
        return int(pruned.removed)

    async def _prune_bookkeeping_for_space(self, bytes_to_free: int) -> int:
        chunk = max(1000, min(50_000, bytes_to_free // 100))
        removed = await self._write(lambda c: queries.prune_bookkeeping_for_space(c, chunk))
        if removed["dedupe"]:
            self.metrics.dedupe_pruned.labels("budget").inc(removed["dedupe"])
            self._alarm("dedupe_pruned", "disk budget: the oldest dedupe keys were removed "
                        "before their window ended (a very late redelivery may be stored "
                        "twice)")
        if removed["quarantine"]:
            self.metrics.quarantine_pruned.inc(removed["quarantine"])
        for table, n in removed.items():
            if n:
                self._log_prune(table, n)
        return int(removed["dedupe"] + removed["quarantine"])

    def _log_prune(self, table: str, n: int, **detail: Any) -> None:
        """One line per table and minute with the rows removed since the last line: under
        a small budget this runs every maintenance tick."""
        now = time.monotonic()
        last, pending = self._prune_log.get(table, (-1e9, 0))
        pending += n
        if now - last >= 60.0:
            log_event(log, logging.WARNING, f"disk budget: removed oldest {table} rows of "
                      "events no longer queued" if table == "audit" else
                      f"disk budget: removed oldest {table} rows", table=table, count=pending,
                      **detail)
            self._prune_log[table] = (now, 0)
        else:
            self._prune_log[table] = (last, pending)

    async def prune_redelivery_horizon(self) -> int:
        """Keep only each source's newest ``redelivery_horizon`` content keys (the source
        sizes its horizon with its own slack; see ``Submission``)."""
        if not self._horizons:
            return 0
        horizons = dict(self._horizons)
        n: int = await self._write(lambda c: queries.prune_redelivery_horizon(c, horizons))
        if n:
            self.metrics.dedupe_pruned.labels("horizon").inc(n)
        return n

    async def prune(self, limit: int = 20_000) -> None:
        """Drop dedupe keys past their window, audit rows past retention; checkpoint WAL.
        Works in transactions of ``limit`` rows per table until nothing is left to drop,
        so a backlog of expired bookkeeping is removed at write speed, not per minute."""
        now = time.time()
        removed = {"dedupe": 0, "audit": 0, "quarantine": 0}
        audit_cfg = self.config.audit
        if audit_cfg.export is not None:
            await self.export_audit()  # what retention would remove must be shipped first
        key = self._checkpoint_key
        while True:
            step = await self._write(
                lambda c: queries.prune(
                    c,
                    dedupe_before=now - self.config.dedupe_window_s,
                    audit_before=utc_iso(now - audit_cfg.retention_days * 86400),
                    quarantine_max_rows=self.config.quarantine_max_rows,
                    limit=limit,
                    audit_export_configured=audit_cfg.export is not None,
                    checkpoint_key=key,
                )
            )
            for k, v in step.items():
                removed[k] += v
            if step["dedupe"] < limit and step["audit"] < limit:
                break
        if removed["dedupe"]:
            self.metrics.dedupe_pruned.labels("window").inc(removed["dedupe"])
        if removed["audit"]:
            self.metrics.audit_pruned.labels("retention").inc(removed["audit"])
            await self._compact_audit_checkpoints()
        if removed["quarantine"]:
            self.metrics.quarantine_pruned.inc(removed["quarantine"])
            log_event(log, logging.WARNING, "quarantine full: oldest records removed",
                      count=removed["quarantine"], kept=self.config.quarantine_max_rows)
        await self.prune_lots(now)
        # Between transactions on the writer's own thread: a burst may have grown the WAL.
        if self._wdb is not None and _file_size(self.path + "-wal") > 64 << 20:
            await self._wdb.run(queries.wal_checkpoint)

    async def _compact_audit_checkpoints(self) -> int:
        """Keep the audit checkpoints few: each prune adds one (``edge.outbox.audit``)."""
        exporting = self.config.audit.export is not None
        key = self._checkpoint_key
        n: int = await self._write(lambda c: queries.compact_audit_checkpoints(
            c, above=AUDIT_CHECKPOINTS_KEPT, export_configured=exporting, checkpoint_key=key))
        return n

    async def export_audit(self) -> int:
        """Ship the audit entries and checkpoints not exported yet to ``audit.export``
        (a bundle folder or an archive URL, ``edge.outbox.audit_export``); returns entries
        shipped. A failure (the archive, the folder, an unreadable token or CA file) raises
        an alarm (retention then keeps the entries) and is retried at the next interval."""
        export = self.config.audit.export
        if export is None:
            return 0
        shipped = 0
        try:
            while True:
                batch = await self.read(audit_export.read_pending, export.max_file_rows)
                if batch is None:
                    break
                if export.type == "http":
                    await audit_export.post_batch(export, batch)
                else:
                    await asyncio.to_thread(audit_export.write_bundle_file, export.path, batch)
                await self._write(partial(audit_export.mark_exported, batch=batch))
                shipped += len(batch.entries)
                if len(batch.entries) < export.max_file_rows:
                    break
        except (OSError, ConfigError) as err:
            where = export.url if export.type == "http" else export.path
            self._alarm("audit_export_failed", f"audit export to {where} failed: {err}; "
                        "retention keeps the entries until it succeeds")
            log_event(log, logging.ERROR, "audit export failed", to=where, error=str(err))
            return shipped
        self._clear("audit_export_failed")
        return shipped

    async def prune_lots(self, now: float | None = None) -> int:
        """Forget released / rejected lots unchanged for ``lot_retention_s`` and CAPA rows
        with nothing counted in their window (the cache after the COMMIT)."""
        now = time.time() if now is None else now
        gone, gone_capa = await self._write(lambda c: lots.prune(
            c, now=now, lots_before=now - self.lot_retention_s))
        self.quality.commit(gone=gone, gone_capa=gone_capa)
        if gone:
            log_event(log, logging.INFO, "forgot released and rejected lots past their "
                      "retention", count=len(gone),
                      retention_days=round(self.lot_retention_s / 86400, 1))
        return len(gone)

    async def stats(self) -> dict[str, Any]:
        st = await self.read(queries.stats)
        st["budget"] = self.budget.snapshot()
        st["alarms"] = self.alarms
        st["accepting"] = self.accepting
        st["inflight"] = {k: len(v) for k, v in self._inflight.items()}
        return st

    # ------------------------------------------------------------------ operator actions

    async def dlq_replay(self, *, ids: Sequence[int] | None = None, sink: str | None = None,
                         actor: str, reason: str) -> int:
        """Move dead letters (by id, or all of a sink) back to the queue; audited."""
        n: int = await self._write(lambda c: queries.dlq_replay(
            c, ids=ids, sink=sink, actor=actor, reason=reason))
        if n:
            self.metrics.events_replayed.labels(sink or "*").inc(n)
            log_event(log, logging.INFO, "dead letters replayed", count=n, actor=actor,
                      reason=reason)
            for s in ([sink] if sink else list(self._new_rows)):
                self.new_rows(s).set()
        return n

    async def dlq_discard(self, *, ids: Sequence[int] | None = None, sink: str | None = None,
                          actor: str, reason: str) -> int:
        """Delete dead letters for good; audited with actor and reason."""
        n: int = await self._write(lambda c: queries.dlq_discard(
            c, ids=ids, sink=sink, actor=actor, reason=reason))
        if n:
            self.metrics.events_discarded.labels(sink or "*").inc(n)
            log_event(log, logging.WARNING, "dead letters discarded", count=n, actor=actor,
                      reason=reason)
        return n

    def _check_storage(self) -> None:
        fault = self._writer.storage_fault if self._writer is not None else None
        if fault is not None:
            self._alarm("outbox_storage", f"outbox storage fault: {fault[1]} — writes fail, "
                        "sources do not acknowledge (the broker keeps the messages); check "
                        "the disk; a restart checks the file and moves it aside if damaged")
        else:
            self._clear("outbox_storage")

    @property
    def storage_fault(self) -> str | None:
        """The last storage fault's message while writes keep failing, else None."""
        fault = self._writer.storage_fault if self._writer is not None else None
        return fault[1] if fault else None

    def writable(self) -> bool:
        """Open and not refusing for space (a storage fault shows in ``storage_fault``)."""
        return not self._closed and self._writer is not None and self.accepting


def _free_bytes(path: str) -> int:
    """Free space of the file system holding ``path`` (unknown: no limit from it)."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _restore_pauses(conn: sqlite3.Connection, now: float) -> dict[str, dict[str, Any]]:
    """At open: settle the stored Retry-After pauses (over, or stepped clock), return what
    is still stored."""
    with queries.transaction(conn):
        pauses.settle_retry_after(conn, now)
    return pauses.load_pauses(conn)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
