"""SQL of the outbox as plain functions over a ``sqlite3.Connection``.

Write functions (``insert_events``, ``apply_resolutions``, ``expire_low``, ``dlq_*`` ...)
assume the caller holds a write transaction: inside the daemon they run as ops of the
group-commit writer; the CLI wraps them in ``transaction(conn)``. Every state change
writes its audit rows in the same transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, assert_never

import orjson

from edge.components import OutcomeKind, Submission
from edge.events import EventClass, payload_sha256
from edge.outbox import audit, lots
from edge.outbox.schema import DDL, DEAD_LETTERS_TABLE, SCHEMA_VERSION
from edge.outbox.sqlutil import in_chunks, in_list, insert_rows
from edge.quality.state import Change
from edge.timefmt import utc_iso

MAX_BODY_CHARS = 65_536


def ensure_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"outbox schema version {version} is newer than this gateway ({SCHEMA_VERSION}); "
            "upgrade the gateway or move the file aside"
        )
    if 0 < version < 3:
        _migrate_to_3(conn)  # before the DDL: its indexes need the new columns
    if 0 < version < 4:
        _migrate_to_4(conn)
    if 0 < version < 5:
        _migrate_to_5(conn)
    conn.executescript(DDL)
    if version == 1:
        _migrate_1_to_2(conn)
    audit.ensure_chain(conn)  # rows of a file before version 4 are chained here
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (utc_iso(),)
    )


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    """The audit table gains ``hash`` (filled by ``audit.ensure_chain``)."""
    cols = [r[1] for r in conn.execute("PRAGMA table_info(audit)")]
    if cols and "hash" not in cols:
        conn.execute("ALTER TABLE audit ADD COLUMN hash TEXT")


def _migrate_to_5(conn: sqlite3.Connection) -> None:
    """Deliveries gain ``done`` (delivered, not yet swept); the lease scan's index leaves
    done rows out. One transaction: a crash leaves version 4 as it was."""
    cols = [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    if not cols or "done" in cols:
        return
    with transaction(conn):
        conn.execute("ALTER TABLE deliveries ADD COLUMN done INTEGER NOT NULL DEFAULT 0")
        conn.execute("DROP INDEX IF EXISTS deliveries_ready")
        conn.execute("CREATE INDEX deliveries_ready ON deliveries(sink, class, seq) "
                     "WHERE done = 0")
        conn.execute("DROP INDEX IF EXISTS audit_key")


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    """Identities are never reused from version 3 on: ``meta.last_seq`` starts at the
    highest stored seq, dead letters get AUTOINCREMENT ids (the table is rebuilt, keeping
    every row and id); stored dedupe keys become identity keys (scope 1)."""
    with transaction(conn):
        cols = [r[1] for r in conn.execute("PRAGMA table_info(dedupe)")]
        if cols and "scope" not in cols:
            conn.execute("ALTER TABLE dedupe ADD COLUMN scope INTEGER NOT NULL DEFAULT 1")
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' "
                           "AND name = 'dead_letters'").fetchone()
        if sql and "AUTOINCREMENT" not in sql[0].upper():
            conn.execute("DROP INDEX IF EXISTS dead_letters_seq")
            conn.execute("DROP INDEX IF EXISTS dead_letters_event")
            conn.execute("ALTER TABLE dead_letters RENAME TO dead_letters_v2")
            conn.execute(DEAD_LETTERS_TABLE)
            conn.execute("INSERT INTO dead_letters SELECT * FROM dead_letters_v2")
            conn.execute("DROP TABLE dead_letters_v2")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone():
            _set_last_seq(conn, conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events"
                                             ).fetchone()[0])


def _last_seq(conn: sqlite3.Connection) -> int:
    """The highest seq ever given (stored in meta; at least the highest seq present)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    stored = int(row[0]) if row else 0
    present = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    return max(stored, int(present))


def _set_last_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?)", (str(seq),))


def _migrate_1_to_2(conn: sqlite3.Connection, chunk: int = 5000) -> None:
    """Version 1 stored the hash of ``data``; version 2 the hash of the whole envelope.

    Each stored row is checked the version-1 way first: a row that still matches gets its
    envelope hash, a row that does not keeps its old value and is dead-lettered as an
    integrity failure before it could be sent — an upgrade never blesses a damaged row.
    """
    last = 0
    while True:
        rows = conn.execute("SELECT seq, sha256, body FROM events WHERE seq > ? ORDER BY seq "
                            "LIMIT ?", (last, chunk)).fetchall()
        if not rows:
            return
        updates = []
        for seq, old, body in rows:
            try:
                intact = payload_sha256(orjson.loads(body).get("data")) == old
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                intact = False
            if intact:
                updates.append((hashlib.sha256(body).hexdigest(), seq))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE events SET sha256 = ? WHERE seq = ?", updates)
        conn.execute("COMMIT")
        last = rows[-1][0]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` for callers outside the daemon's writer (the CLI)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# --------------------------------------------------------------------------- ingest


@dataclass
class SubmitResult:
    ids: list[str] = field(default_factory=list)
    stored_by_source: Counter[str] = field(default_factory=Counter)
    duplicates_by_source: Counter[str] = field(default_factory=Counter)
    unrouted_by_type: Counter[str] = field(default_factory=Counter)
    # the lot / CAPA rows the items' changes wrote (``Submission.quality``), for the cache
    quality: lots.Applied | None = None


Prepared = tuple[Submission, list[str], bytes]  # submission, sinks, stored body

SCOPE_REDELIVERY = 0  # content hash: matched only for a redelivered copy
SCOPE_IDENTITY = 1  # station message id, node@timestamp: matched within the window


def insert_event_batches(conn: sqlite3.Connection, payloads: list[tuple[list[Prepared], float]]
                         ) -> list[SubmitResult]:
    """Several submits in one call (the writer merges concurrent producers' submits); each
    payload is ``(prepared, dedupe_window_s)``, the window being the outbox's setting."""
    merged: list[Prepared] = [p for prepared, _ in payloads for p in prepared]
    whole = insert_events(conn, merged, dedupe_window_s=payloads[0][1])
    out: list[SubmitResult] = []
    start = 0
    for prepared, _ in payloads:
        part = SubmitResult(ids=whole.ids[start:start + len(prepared)])
        for (item, sinks, _), eid in zip(prepared, part.ids, strict=True):
            ev = item.event
            if eid != ev.id:
                part.duplicates_by_source[ev.source] += 1
            elif not sinks:
                part.unrouted_by_type[ev.type] += 1
            else:
                part.stored_by_source[ev.source] += 1
            if item.quality:
                part.quality = whole.quality  # every row of the transaction: same revision
        start += len(prepared)
        out.append(part)
    return out


def _existing_dedupe(conn: sqlite3.Connection, wanted: dict[tuple[str, int], list[str]],
                     not_before: float) -> dict[tuple[str, str, int], str]:
    """(source, key, scope) → event id of the stored copy: identity keys seen within the
    window, content hashes of the source's redelivery horizon (one query a chunk)."""
    found: dict[tuple[str, str, int], str] = {}
    for (source, scope), keys in wanted.items():
        since = not_before if scope == SCOPE_IDENTITY else 0.0
        for chunk in in_chunks(keys):
            marks, params = in_list(chunk)
            for key, event_id in conn.execute(
                f"SELECT key, event_id FROM dedupe WHERE source = ? AND key IN ({marks}) "
                "AND scope = ? AND created_at >= ?", [source, *params, scope, since]
            ).fetchall():
                found[(source, key, scope)] = event_id
    return found


def _matchable(item: Submission) -> bool:
    """May this copy be matched to an earlier one? (DESIGN invariant 3: only redeliveries
    are matched by content; identity keys always within their window.)"""
    return item.dedupe_key is not None and (item.redelivered or not item.redelivery_only)


def insert_events(
    conn: sqlite3.Connection,
    prepared: Sequence[Prepared],
    *,
    dedupe_window_s: float,
) -> SubmitResult:
    """Store (submission, sinks, body) tuples in order; see ``Outbox.submit``.

    A matched copy returns the stored copy's id and stores nothing; a ``derived`` item
    whose cause (the nearest earlier non-derived item) was matched is dropped too (its id
    in the result is ``""``). Every new event takes a seq above ``meta.last_seq``. The lot
    and CAPA changes of the items kept (stored, or unrouted) are applied in item order
    (``edge.outbox.lots``); a matched or dropped item's changes are not.
    """
    now = time.time()
    ts = utc_iso(now)
    result = SubmitResult()
    next_seq = _last_seq(conn) + 1
    ev_rows: list[tuple[Any, ...]] = []
    dl_rows: list[tuple[Any, ...]] = []
    au_rows: list[audit.AuditRow] = []
    dd_rows: dict[tuple[str, str], tuple[Any, ...]] = {}
    wanted: dict[tuple[str, int], list[str]] = {}
    for item, _, _ in prepared:
        if _matchable(item):
            scope = SCOPE_REDELIVERY if item.redelivery_only else SCOPE_IDENTITY
            wanted.setdefault((item.event.source, scope), []).append(item.dedupe_key or "")
    seen = _existing_dedupe(conn, wanted, now - dedupe_window_s) if wanted else {}
    cause_matched = False
    changes: list[Change] = []
    for item, sinks, body in prepared:
        ev = item.event
        if item.derived and cause_matched:
            result.ids.append("")
            result.duplicates_by_source[ev.source] += 1
            continue
        if not item.derived:
            cause_matched = False
        if item.dedupe_key is not None:
            scope = SCOPE_REDELIVERY if item.redelivery_only else SCOPE_IDENTITY
            k = (ev.source, item.dedupe_key, scope)
            first = seen.get(k) if _matchable(item) else None
            if first is not None:
                result.ids.append(first)
                result.duplicates_by_source[ev.source] += 1
                au_rows.append(audit.audit_row(
                    "duplicate_dropped", event_id=first, ordering_key=ev.ordering_key, ts=ts,
                    reason="redelivery" if scope == SCOPE_REDELIVERY else "identity key",
                    detail={"source": ev.source, "dropped_id": ev.id,
                            "redelivered": item.redelivered}))
                cause_matched = not item.derived
                continue
            seen[k] = ev.id  # a later copy in this same batch matches this one
            dd_rows[(ev.source, item.dedupe_key)] = (ev.source, item.dedupe_key, ev.id, now,
                                                     scope)
        result.ids.append(ev.id)
        changes.extend(item.quality)
        cls = int(ev.event_class)
        if not sinks:
            result.unrouted_by_type[ev.type] += 1
            au_rows.append(
                audit.audit_row("unrouted", event_id=ev.id, reason="no sink route for type",
                                ordering_key=ev.ordering_key,
                                detail={"type": ev.type, "source": ev.source}, ts=ts)
            )
            continue
        seq = next_seq
        next_seq += 1
        body_sha = hashlib.sha256(body).hexdigest()
        ev_rows.append((seq, ev.id, ev.type, cls, ev.ordering_key, ev.source, now,
                        body_sha, body))
        for sink in sinks:
            dl_rows.append((seq, sink, cls, ev.ordering_key))
        au_rows.append(
            audit.audit_row(
                "stored", event_id=ev.id, ordering_key=ev.ordering_key, ts=ts,
                detail={"type": ev.type, "class": EventClass(cls).name, "source": ev.source,
                        "sha256": ev.payload_sha256, "body_sha256": body_sha,
                        "sinks": sinks},
            )
        )
        result.stored_by_source[ev.source] += 1
    insert_rows(conn, "events(seq, id, type, class, ordering_key, source, received_at, "
                "sha256, body)", ev_rows)
    if ev_rows:
        _set_last_seq(conn, next_seq - 1)
    insert_rows(conn, "deliveries(seq, sink, class, ordering_key)", dl_rows)
    # REPLACE: the newest copy of a key (and a new rowid: the horizon counts from the end)
    insert_rows(conn, "dedupe(source, key, event_id, created_at, scope)",
                list(dd_rows.values()), verb="INSERT OR REPLACE")
    audit.insert_audit(conn, au_rows)
    if changes:
        result.quality = lots.apply_changes(conn, changes, now)
    return result


def insert_quarantine(conn: sqlite3.Connection, row: tuple[Any, ...], *,
                      audited: bool = False) -> None:
    """Keep an inbound record (received_at, source, reason, detail, raw, meta); with
    ``audited`` also a ``quarantined`` audit row (source, reason, quarantine id, raw
    SHA-256 and size)."""
    cur = conn.execute(
        "INSERT INTO quarantine(received_at, source, reason, detail, raw, meta) "
        "VALUES (?,?,?,?,?,?)",
        row,
    )
    if audited:
        raw = row[4] or b""
        audit.insert_audit(conn, [audit.audit_row(
            "quarantined", reason=row[2], ts=utc_iso(row[0]),
            detail={"source": row[1], "quarantine_id": cur.lastrowid,
                    "raw_sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                    **({"detail": row[3][:200]} if row[3] else {})})])


# --------------------------------------------------------------------------- delivery


@dataclass(slots=True)
class Resolution:
    """What happened to one leased row, for ``apply_resolutions``; the forwarder builds it
    from the sink's ``Outcome`` (``kind`` is the outcome's kind; its name, e.g.
    ``"delivered"``, is accepted too).

    - ``delivered`` / ``duplicate``: the row leaves, audited ``delivered``.
    - ``retry``: the row stays until ``next_at``; an attempted one counts an attempt and is
      audited ``retry``; one never attempted (``attempted=False``, ``next_at`` 0) is left
      as it is.
    - ``sink_fault``: like ``retry``, but the attempt does not count towards
      ``retry.max_attempts`` (it says nothing about the event).
    - ``dead_letter``: the row moves to the dead-letter table, audited ``dead_lettered``.
    - ``unrouted``: the row stays until ``next_at`` with the reason as its last error.
    """

    seq: int
    event_id: str
    kind: OutcomeKind
    status: int | None = None
    reason: str = ""
    body: str | None = None
    next_at: float = 0.0
    attempted: bool = True
    event_class: int = 0
    ordering_key: str | None = None
    type: str = ""

    def __post_init__(self) -> None:
        self.kind = OutcomeKind(self.kind)  # ValueError for a name that is no kind


def _gc_events(conn: sqlite3.Connection, seqs: Sequence[int]) -> None:
    """Delete events no delivery row and no dead letter references any more."""
    for chunk in in_chunks(seqs):
        marks, params = in_list(chunk)
        conn.execute(
            f"DELETE FROM events WHERE seq IN ({marks}) "
            "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = events.seq) "
            "AND NOT EXISTS (SELECT 1 FROM dead_letters x WHERE x.seq = events.seq)",
            params,
        )


def _mark_delivered(conn: sqlite3.Connection, sink: str, seqs: Sequence[int]) -> list[int]:
    """Mark the rows of ``sink`` done (the sweep deletes them later); return the seqs
    that were there and not done yet."""
    marked: list[int] = []
    for chunk in in_chunks(seqs):
        marks, params = in_list(chunk)
        marked.extend(r[0] for r in conn.execute(
            f"UPDATE deliveries SET done = 1 WHERE sink = ? AND seq IN ({marks}) "
            "AND done = 0 RETURNING seq", [sink, *params]).fetchall())
    return marked


SWEEP_ROWS = 5_000  # delivered rows swept per transaction
SWEEP_EVENTS = 20_000  # seqs of events below the low-water mark deleted per transaction


def pending_sweep(conn: sqlite3.Connection) -> int:
    """Delivered rows not swept yet."""
    return int(conn.execute("SELECT COUNT(*) FROM deliveries WHERE done = 1").fetchone()[0])


@dataclass(slots=True)
class Swept:
    rows: int = 0  # delivery rows deleted
    events: int = 0  # events deleted
    more: bool = False  # a limit was reached: call again


def sweep_delivered(conn: sqlite3.Connection, limit: int | None = None,
                    events_limit: int | None = None) -> Swept:
    """The deferred delete, in one transaction: up to ``limit`` delivered rows (lowest
    seqs first), then the events below the low-water mark — every seq below the oldest
    delivery row still present — that no dead letter holds, up to ``events_limit`` seqs
    from the oldest event. Events are deleted in seq ranges (whole pages at once), not one
    by one as their last row goes: an event delivered ahead of older ones (a higher
    class, a lot pulled forward) keeps its row until the mark passes it, or until
    ``sweep_orphans`` (disk pressure) takes it."""
    limit = SWEEP_ROWS if limit is None else limit
    events_limit = SWEEP_EVENTS if events_limit is None else events_limit
    out = Swept()
    seqs = [r[0] for r in conn.execute(
        "SELECT seq FROM deliveries WHERE done = 1 ORDER BY seq LIMIT ?", (limit,))]
    if seqs:
        out.rows = int(conn.execute("DELETE FROM deliveries WHERE done = 1 AND seq <= ?",
                                    (seqs[-1],)).rowcount)
        out.more = len(seqs) == limit
    # the oldest event no dead letter holds (those stay where they are)
    first_row = conn.execute(
        "SELECT seq FROM events WHERE NOT EXISTS (SELECT 1 FROM dead_letters x "
        "WHERE x.seq = events.seq) ORDER BY seq LIMIT 1").fetchone()
    if first_row is None:
        return out
    first = int(first_row[0])
    oldest_row = conn.execute("SELECT MIN(seq) FROM deliveries").fetchone()[0]
    mark = _last_seq(conn) + 1 if oldest_row is None else int(oldest_row)
    upto = min(mark, first + events_limit)
    if upto > first:
        out.events = int(conn.execute(
            "DELETE FROM events WHERE seq < ? AND NOT EXISTS "
            "(SELECT 1 FROM dead_letters x WHERE x.seq = events.seq)", (upto,)).rowcount)
        out.more = out.more or upto < mark
    return out


def sweep_orphans(conn: sqlite3.Connection, after: int, window: int = SWEEP_EVENTS
                  ) -> tuple[int, int]:
    """Delete the events in ``(after, after + window]`` that no delivery row (done or
    not) and no dead letter references; returns (events deleted, the next ``after``, or
    -1 past the last event). One row at a time: for disk pressure, not the steady path."""
    upto = after + window
    n = conn.execute(
        "DELETE FROM events WHERE seq > ? AND seq <= ? "
        "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = events.seq) "
        "AND NOT EXISTS (SELECT 1 FROM dead_letters x WHERE x.seq = events.seq)",
        (after, upto)).rowcount
    top = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    return int(n), (-1 if top is None or upto >= top else upto)


def sweep_all(conn: sqlite3.Connection) -> int:
    """Sweep every delivered row and every event that left the outbox: operator changes
    (replay, reroute, discard) then see only rows still to deliver. Returns the rows."""
    total = 0
    while True:
        swept = sweep_delivered(conn, limit=1 << 30)
        total += swept.rows
        if not swept.more:
            break
    after = 0
    while after >= 0:
        _, after = sweep_orphans(conn, after)
    return total


def apply_resolutions(
    conn: sqlite3.Connection, sink: str, resolutions: Sequence[Resolution]
) -> None:
    """Record a lease's outcomes. Only rows that still exist change: a row an operator
    discarded meanwhile is not resurrected, and since a seq is never reused, a completion
    can only ever touch the rows its lease held (DESIGN invariant 2)."""
    ts = utc_iso()
    now = time.time()
    done: dict[int, Resolution] = {}
    au_rows: list[audit.AuditRow] = []
    for r in resolutions:
        kind = r.kind
        if kind is OutcomeKind.delivered or kind is OutcomeKind.duplicate:
            done[r.seq] = r
        elif kind is OutcomeKind.retry or kind is OutcomeKind.sink_fault:
            if not r.attempted and not r.next_at:
                continue  # never sent (shutdown, key blocked): nothing changes for the row
            counts = r.attempted and kind is OutcomeKind.retry
            cur = conn.execute(
                "UPDATE deliveries SET next_at = ?, attempts = attempts + ?, last_error = ? "
                "WHERE seq = ? AND sink = ?",
                (r.next_at, 1 if counts else 0, r.reason[:500] or None, r.seq, sink))
            if r.attempted and cur.rowcount:
                au_rows.append(audit.audit_row(
                    "retry", event_id=r.event_id, sink=sink, ts=ts, reason=r.reason[:500],
                    detail={"status": r.status, "next_attempt": utc_iso(r.next_at)}))
        elif kind is OutcomeKind.dead_letter:
            cur = conn.execute(
                "INSERT INTO dead_letters(seq, sink, event_id, type, class, ordering_key, status,"
                " reason, response_body, attempts, dead_at) "
                "SELECT d.seq, d.sink, e.id, e.type, d.class, d.ordering_key, ?, ?, ?, "
                "d.attempts + ?, ? FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.seq = ? AND d.sink = ?",
                (r.status, r.reason[:2000], (r.body or "")[:MAX_BODY_CHARS] or None,
                 1 if r.attempted else 0, now, r.seq, sink),
            )
            if cur.rowcount:
                conn.execute("DELETE FROM deliveries WHERE seq = ? AND sink = ?", (r.seq, sink))
                au_rows.append(audit.audit_row(
                    "dead_lettered", event_id=r.event_id, sink=sink, ts=ts,
                    reason=r.reason[:2000], ordering_key=r.ordering_key,
                    detail={"status": r.status}))
        elif kind is OutcomeKind.unrouted:
            conn.execute(
                "UPDATE deliveries SET next_at = ?, last_error = ? WHERE seq = ? AND sink = ?",
                (r.next_at, ("unrouted: " + r.reason)[:500], r.seq, sink),
            )
        else:
            assert_never(kind)
    if done:
        for seq in _mark_delivered(conn, sink, list(done)):
            r = done[seq]
            au_rows.append(audit.audit_row(
                "delivered", event_id=r.event_id, sink=sink, ts=ts,
                detail={"status": r.status},
                reason="duplicate: " + r.reason if r.kind is OutcomeKind.duplicate else None))
    audit.insert_audit(conn, au_rows)


# --------------------------------------------------------------------------- budget


def used_parts(conn: sqlite3.Connection, path: str) -> tuple[int, int]:
    """(bytes of database pages in use, bytes of the WAL file)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    try:
        wal = os.path.getsize(path + "-wal")
    except OSError:
        wal = 0
    return int((pages - free) * page_size), int(wal)


def used_bytes(conn: sqlite3.Connection, path: str) -> int:
    """Bytes the outbox occupies on disk (pages in use and the WAL)."""
    db, wal = used_parts(conn, path)
    return db + wal


def expire_low(conn: sqlite3.Connection, limit: int,
               claim: Callable[[list[int], int], list[int]] = lambda seqs, n: seqs[:n]) -> int:
    """Delete the oldest ``low`` events (all their delivery rows); never other classes.

    ``claim(seqs, n)`` runs on this (the writer's) thread right before the delete and
    returns at most ``n`` of ``seqs`` that may go: the outbox leaves out rows in flight at
    that moment and marks the ones it returns so a lease read that raced with this
    transaction does not hand them out."""
    rows = conn.execute(
        "SELECT seq, id FROM events WHERE class = ? "
        "AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE seq = events.seq) "
        "AND EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = events.seq AND d.done = 0) "
        "ORDER BY seq LIMIT ?",
        (int(EventClass.low), limit * 2),
    ).fetchall()
    allowed = set(claim([r[0] for r in rows], limit))
    rows = [r for r in rows if r[0] in allowed]
    if not rows:
        return 0
    conn.executemany("DELETE FROM deliveries WHERE seq = ?", [(r[0],) for r in rows])
    conn.executemany("DELETE FROM events WHERE seq = ?", [(r[0],) for r in rows])
    ts = utc_iso()
    audit.insert_audit(conn, [
        audit.audit_row("expired", event_id=r[1], ts=ts, reason="disk budget: class low",
                        ordering_key=None)
        for r in rows
    ])
    return len(rows)


def prune(conn: sqlite3.Connection, *, dedupe_before: float, audit_before: str,
          quarantine_max_rows: int, limit: int = 20_000,
          audit_export_configured: bool = False,
          checkpoint_key: bytes | None = None) -> dict[str, int]:
    """Age/size limits of the side tables, at most ``limit`` rows per table and call
    (the caller repeats while a table reports ``limit``); returns rows removed per table.

    Audit rows go with a ``pruned`` checkpoint (``audit.prune_entries``); with
    ``audit_export_configured`` only rows the export has shipped may go."""
    # rowid order is insertion order (INSERT OR REPLACE takes a new rowid): oldest first
    dedupe = conn.execute(
        "DELETE FROM dedupe WHERE rowid IN (SELECT rowid FROM dedupe WHERE scope = 1 "
        "ORDER BY rowid LIMIT ?) AND created_at < ?", (limit, dedupe_before)
    ).rowcount
    # seq and ts grow together, so the oldest rows are the first by seq: no ts index
    upto = audit_exported_through(conn) if audit_export_configured else 2**62
    old = [(seq, digest) for seq, digest, ts in conn.execute(
        "SELECT seq, hash, ts FROM audit WHERE seq <= ? AND seq < (SELECT MAX(seq) FROM audit) "
        "ORDER BY seq LIMIT ?", (upto, limit))
        if ts < audit_before]
    audit_rows = audit.prune_entries(conn, old, reason="retention", key=checkpoint_key,
                                     detail={"before": audit_before})
    quarantine = conn.execute(
        "DELETE FROM quarantine WHERE id <= "
        "(SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)", (quarantine_max_rows,)
    ).rowcount
    return {"dedupe": dedupe, "audit": audit_rows, "quarantine": quarantine}


def prune_redelivery_horizon(conn: sqlite3.Connection, horizons: dict[str, int]) -> int:
    """Keep only the newest ``horizons[source]`` content-hash keys of each source: older
    messages were acknowledged long ago and can no longer come back as a redelivery."""
    removed = 0
    for source, keep in horizons.items():
        removed += conn.execute(
            "DELETE FROM dedupe WHERE source = ? AND scope = 0 AND rowid <= ("
            "SELECT rowid FROM dedupe INDEXED BY dedupe_recent WHERE source = ? AND scope = 0 "
            "ORDER BY rowid DESC LIMIT 1 OFFSET ?)", (source, source, max(1, keep))
        ).rowcount
    return removed


def prune_bookkeeping_for_space(conn: sqlite3.Connection, limit: int) -> dict[str, int]:
    """Disk pressure, before backpressure: give up the oldest identity dedupe keys (their
    window shrinks) and the oldest half of the quarantine. Queued events are untouched."""
    dedupe = conn.execute(
        "DELETE FROM dedupe WHERE rowid IN (SELECT rowid FROM dedupe WHERE scope = 1 "
        "ORDER BY rowid LIMIT ?)", (limit,)).rowcount
    total = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
    quarantine = conn.execute(
        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?)",
        (min(limit, (total + 1) // 2),)).rowcount
    return {"dedupe": dedupe, "quarantine": quarantine}


@dataclass
class AuditPruned:
    removed: int = 0
    oldest_kept: str | None = None  # ts of the oldest audit row kept
    unexported: int = 0  # of the removed, rows the configured export had not shipped yet


def audit_exported_through(conn: sqlite3.Connection) -> int:
    """The highest audit seq the export has shipped (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'audit_exported_seq'").fetchone()
    return int(row[0]) if row else 0


def prune_finished_audit(conn: sqlite3.Connection, limit: int, *,
                         export_configured: bool = False,
                         checkpoint_key: bytes | None = None) -> AuditPruned:
    """Disk pressure: drop the oldest audit rows of events that left the outbox, with a
    ``pruned`` checkpoint (and, when rows the export had not shipped yet go, an
    ``audit_pruned_unexported`` audit row saying which) in the same transaction.

    Rows of events still queued or dead-lettered are never touched, nor the newest row
    (the chain continues from it).
    """
    rows = conn.execute(
        "SELECT seq, hash FROM audit WHERE (event_id IS NULL "
        "OR event_id NOT IN (SELECT id FROM events)) AND seq < (SELECT MAX(seq) FROM audit) "
        "ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    out = AuditPruned()
    if rows:
        through = audit_exported_through(conn) if export_configured else None
        late = [r[0] for r in rows if through is not None and r[0] > through]
        out.unexported = len(late)
        out.removed = audit.prune_entries(
            conn, rows, reason="disk budget", key=checkpoint_key,
            detail={"unexported": len(late)} if export_configured else None)
        if late:
            audit.insert_audit(conn, [audit.audit_row(
                "audit_pruned_unexported", reason="disk budget",
                detail={"count": len(late), "first_seq": late[0], "last_seq": late[-1]})])
    oldest = conn.execute("SELECT ts FROM audit ORDER BY seq LIMIT 1").fetchone()
    out.oldest_kept = oldest[0] if oldest else None
    return out


def compact_audit_checkpoints(conn: sqlite3.Connection, *, above: int,
                              export_configured: bool = False,
                              checkpoint_key: bytes | None = None) -> int:
    """More than ``above`` checkpoints: replace them all by one
    (``audit.compact_checkpoints``); with export configured only once the export has
    shipped them all (the bundle keeps every checkpoint). Returns how many were replaced."""
    count, newest = conn.execute("SELECT COUNT(*), MAX(id) FROM audit_checkpoints").fetchone()
    if count <= above:
        return 0
    if export_configured:
        row = conn.execute("SELECT value FROM meta WHERE key = 'audit_exported_checkpoint'"
                           ).fetchone()
        if (int(row[0]) if row else 0) < newest:
            return 0
    return audit.compact_checkpoints(conn, key=checkpoint_key)


def set_wal_limits(conn: sqlite3.Connection, limit_bytes: int) -> None:
    """Auto-checkpoint at ``limit_bytes`` of WAL and truncate the file back to it after."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    # Not capped at SQLite's 1000 pages: a drained batch touches ~4 random pages per event,
    # so a 500-row commit overflowed a 4 MB WAL and paid a checkpoint every time.
    conn.execute(f"PRAGMA wal_autocheckpoint={max(16, limit_bytes // page_size)}")
    conn.execute(f"PRAGMA journal_size_limit={int(limit_bytes)}")


def wal_checkpoint(conn: sqlite3.Connection) -> None:
    """Fold the WAL back into the database and truncate it (outside any transaction)."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# --------------------------------------------------------------------------- reading


def stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Depth per sink and class, oldest age, retrying, unrouted, dead letters, quarantine —
    all from one snapshot (one read transaction), so a delivery committed meanwhile cannot
    show up as both queued and dead-lettered."""
    if conn.in_transaction:
        return _stats(conn)
    conn.execute("BEGIN")
    try:
        return _stats(conn)
    finally:
        conn.execute("COMMIT")


def _stats(conn: sqlite3.Connection) -> dict[str, Any]:
    now = time.time()
    sinks: dict[str, dict[str, Any]] = {}

    def entry(sink: str) -> dict[str, Any]:
        return sinks.setdefault(sink, {
            "depth": {c.name: 0 for c in EventClass}, "total": 0, "retrying": 0,
            "unrouted": 0, "oldest_age_s": None, "dead_letters": 0, "parked": 0,
            "parked_keys": [],
        })

    for sink, cls, n in conn.execute(
        "SELECT sink, class, COUNT(*) FROM deliveries WHERE done = 0 GROUP BY sink, class"
    ):
        e = entry(sink)
        e["depth"][EventClass(cls).name] = n
        e["total"] += n
    for sink, retrying, unrouted in conn.execute(
        "SELECT sink, SUM(attempts > 0), SUM(last_error LIKE 'unrouted:%') FROM deliveries "
        "INDEXED BY deliveries_retrying "
        "WHERE (attempts > 0 OR last_error IS NOT NULL) AND done = 0 GROUP BY sink"
    ):
        entry(sink)["retrying"] = retrying or 0
        entry(sink)["unrouted"] = unrouted or 0
    for sink in list(sinks):
        # The sink's oldest row is the smallest head of its class ranges in deliveries_ready
        # (four index probes); ORDER BY seq over the sink sorts its whole backlog.
        heads = [
            conn.execute("SELECT MIN(seq) FROM deliveries WHERE sink = ? AND class = ? "
                         "AND done = 0",
                         (sink, int(c))).fetchone()[0]
            for c in EventClass
        ]
        oldest = min((h for h in heads if h is not None), default=None)
        row = conn.execute(
            "SELECT received_at FROM events WHERE seq = ?", (oldest,)
        ).fetchone() if oldest is not None else None
        if row is None:
            row = conn.execute(
                "SELECT e.received_at FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.sink = ? AND d.done = 0 ORDER BY d.seq LIMIT 1", (sink,)
            ).fetchone()
        if row:
            sinks[sink]["oldest_age_s"] = round(max(0.0, now - row[0]), 3)
    for sink, n in conn.execute("SELECT sink, COUNT(*) FROM dead_letters GROUP BY sink"):
        entry(sink)["dead_letters"] = n
        keys = parked_keys(conn, sink, limit=PARKED_KEYS_SHOWN)
        entry(sink)["parked"] = conn.execute(
            "SELECT COUNT(DISTINCT ordering_key) FROM dead_letters WHERE sink = ? "
            "AND ordering_key IS NOT NULL", (sink,)).fetchone()[0]
        entry(sink)["parked_keys"] = keys
    quarantine = dict(conn.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason"))
    events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return {"sinks": sinks, "events": events, "quarantine": quarantine,
            "dead_letters": sum(s["dead_letters"] for s in sinks.values())}


PARKED_KEYS_SHOWN = 20


def parked_key_set(conn: sqlite3.Connection, sink: str) -> set[str]:
    """Ordering keys of ``sink`` held by a dead letter (DESIGN invariant 4)."""
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT ordering_key FROM dead_letters INDEXED BY dead_letters_key "
        "WHERE sink = ? AND ordering_key IS NOT NULL", (sink,))}


def parked_keys(conn: sqlite3.Connection, sink: str, *, limit: int) -> list[dict[str, Any]]:
    """The oldest parked keys of ``sink`` with the dead letter that holds each and the
    number of events waiting behind it."""
    out = []
    for key, dl_id, event_id, dead_at in conn.execute(
        "SELECT ordering_key, MIN(id), event_id, dead_at FROM dead_letters "
        "WHERE sink = ? AND ordering_key IS NOT NULL GROUP BY ordering_key "
        "ORDER BY MIN(id) LIMIT ?", (sink, limit)):
        waiting = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND ordering_key = ? "
            "AND done = 0",
            (sink, key)).fetchone()[0]
        out.append({"key": key, "dead_letter_id": dl_id, "event_id": event_id,
                    "since": utc_iso(dead_at), "waiting": waiting})
    return out


_DLQ_COLS = ("id", "seq", "sink", "event_id", "type", "class", "ordering_key", "status",
             "reason", "response_body", "attempts", "dead_at")


def _dlq_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(_DLQ_COLS, row, strict=True))
    d["class"] = EventClass(d["class"]).name
    d["dead_at"] = utc_iso(d["dead_at"])
    return d


def dlq_list(conn: sqlite3.Connection, *, sink: str | None = None, limit: int = 100
             ) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(_DLQ_COLS)} FROM dead_letters"
    args: list[Any] = []
    if sink:
        sql += " WHERE sink = ?"
        args.append(sink)
    sql += " ORDER BY id LIMIT ?"
    args.append(limit)
    return [_dlq_dict(r) for r in conn.execute(sql, args)]


def dlq_show(conn: sqlite3.Connection, ref: str) -> dict[str, Any] | None:
    """A dead letter by its numeric id or by event id, with the stored event."""
    col = "id" if ref.isdigit() else "event_id"
    row = conn.execute(
        f"SELECT {', '.join(_DLQ_COLS)} FROM dead_letters WHERE {col} = ? ORDER BY id LIMIT 1",
        (int(ref) if col == "id" else ref,),
    ).fetchone()
    if row is None:
        return None
    d = _dlq_dict(row)
    ev = conn.execute("SELECT body FROM events WHERE seq = ?", (d["seq"],)).fetchone()
    d["event"] = orjson.loads(ev[0]) if ev else None
    return d


def _select_dlq(conn: sqlite3.Connection, ids: Sequence[int] | None, sink: str | None
                ) -> list[tuple[int, int, str, str, int, str | None]]:
    sql = "SELECT id, seq, sink, event_id, class, ordering_key FROM dead_letters"
    clauses: list[str] = []
    args: list[Any] = []
    if ids is not None:
        clauses.append(f"id IN ({','.join('?' * len(ids))})")
        args.extend(ids)
    if sink:
        clauses.append("sink = ?")
        args.append(sink)
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    return conn.execute(sql + " ORDER BY id", args).fetchall()


def dlq_replay(conn: sqlite3.Connection, *, ids: Sequence[int] | None, sink: str | None,
               actor: str, reason: str) -> int:
    """Move dead letters back to the queue (attempts reset), audited with actor and reason."""
    sweep_all(conn)
    rows = _select_dlq(conn, ids, sink)
    ts = utc_iso()
    for dl_id, seq, dl_sink, _event_id, cls, key in rows:
        conn.execute(
            "INSERT OR IGNORE INTO deliveries(seq, sink, class, ordering_key) VALUES (?,?,?,?)",
            (seq, dl_sink, cls, key),
        )
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dl_id,))
    audit.insert_audit(conn, [
        audit.audit_row("replayed", event_id=r[3], sink=r[2], actor=actor, reason=reason, ts=ts)
        for r in rows
    ])
    return len(rows)


def dlq_discard(conn: sqlite3.Connection, *, ids: Sequence[int] | None, sink: str | None,
                actor: str, reason: str) -> int:
    rows = _select_dlq(conn, ids, sink)
    ts = utc_iso()
    conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(r[0],) for r in rows])
    _gc_events(conn, [r[1] for r in rows])
    audit.insert_audit(conn, [
        audit.audit_row("discarded", event_id=r[3], sink=r[2], actor=actor, reason=reason, ts=ts)
        for r in rows
    ])
    return len(rows)


def reroute_sink(conn: sqlite3.Connection, *, from_sink: str, to_sink: str, actor: str,
                 reason: str) -> int:
    """Move every queued row of ``from_sink`` (e.g. removed from config) to ``to_sink``.

    An event that already has a row at ``to_sink`` keeps it: a queued row stays queued, a
    dead letter stays a dead letter (it is not queued a second time beside it; an
    operator's replay decides). Every moved row is audited as ``rerouted``."""
    if from_sink == to_sink:
        # nothing to move; the insert below would be a no-op and the delete would drop
        # every queued row of the sink
        return 0
    sweep_all(conn)
    rows = conn.execute(
        "SELECT d.seq, e.id FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.sink = ?",
        (from_sink,),
    ).fetchall()
    conn.execute(
        "INSERT OR IGNORE INTO deliveries(seq, sink, class, ordering_key) "
        "SELECT seq, ?, class, ordering_key FROM deliveries WHERE sink = ? "
        "AND NOT EXISTS (SELECT 1 FROM dead_letters x WHERE x.seq = deliveries.seq "
        "AND x.sink = ?)",
        (to_sink, from_sink, to_sink),
    )
    conn.execute("DELETE FROM deliveries WHERE sink = ?", (from_sink,))
    ts = utc_iso()
    audit.insert_audit(conn, [
        audit.audit_row("rerouted", event_id=eid, sink=to_sink, actor=actor, reason=reason,
                        ts=ts, detail={"from": from_sink})
        for _, eid in rows
    ])
    return len(rows)


def discard_sink(conn: sqlite3.Connection, *, sink: str, actor: str, reason: str) -> int:
    """Drop every queued row of ``sink`` (operator decision, audited per event)."""
    sweep_all(conn)
    rows = conn.execute(
        "SELECT d.seq, e.id FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.sink = ?",
        (sink,),
    ).fetchall()
    conn.execute("DELETE FROM deliveries WHERE sink = ?", (sink,))
    _gc_events(conn, [r[0] for r in rows])
    ts = utc_iso()
    audit.insert_audit(conn, [
        audit.audit_row("discarded", event_id=eid, sink=sink, actor=actor, reason=reason, ts=ts)
        for _, eid in rows
    ])
    return len(rows)


def event_by_id(conn: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT seq, body FROM events WHERE id = ?", (event_id,)).fetchone()
    if row is None:
        return None
    pending = [
        {"sink": s, "attempts": a, "next_at": utc_iso(n) if n else None, "last_error": e}
        for s, a, n, e in conn.execute(
            "SELECT sink, attempts, next_at, last_error FROM deliveries WHERE seq = ? "
            "AND done = 0", (row[0],)
        )
    ]
    return {"event": orjson.loads(row[1]), "pending": pending}
