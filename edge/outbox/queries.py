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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edge import audit
from edge.events import Event, EventClass, payload_sha256
from edge.outbox.schema import DDL, SCHEMA_VERSION
from edge.outbox.sqlutil import in_chunks, in_list, insert_rows

if TYPE_CHECKING:
    from edge.outbox.store import Resolution

MAX_BODY_CHARS = 65_536


def ensure_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"outbox schema version {version} is newer than this gateway ({SCHEMA_VERSION}); "
            "upgrade the gateway or move the file aside"
        )
    conn.executescript(DDL)
    if version == 1:
        _migrate_1_to_2(conn)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (audit.utc_iso(),)
    )


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


Prepared = tuple[Event, str | None, list[str], bytes]


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
        for (ev, _, sinks, _), eid in zip(prepared, part.ids, strict=True):
            if eid != ev.id:
                part.duplicates_by_source[ev.source] += 1
            elif not sinks:
                part.unrouted_by_type[ev.type] += 1
            else:
                part.stored_by_source[ev.source] += 1
        start += len(prepared)
        out.append(part)
    return out


def _existing_dedupe(conn: sqlite3.Connection, wanted: dict[str, list[str]],
                     not_before: float) -> dict[tuple[str, str], str]:
    """(source, key) → first event id, for keys seen within the window (one query a chunk)."""
    found: dict[tuple[str, str], str] = {}
    for source, keys in wanted.items():
        for chunk in in_chunks(keys):
            marks, params = in_list(chunk)
            for key, event_id in conn.execute(
                f"SELECT key, event_id FROM dedupe WHERE source = ? AND key IN ({marks}) "
                "AND created_at >= ?", [source, *params, not_before]
            ).fetchall():
                found[(source, key)] = event_id
    return found


def insert_events(
    conn: sqlite3.Connection,
    prepared: Sequence[Prepared],
    *,
    dedupe_window_s: float,
) -> SubmitResult:
    """Store (event, dedupe_key, sinks, body) tuples; see ``Outbox.submit``."""
    now = time.time()
    ts = audit.utc_iso(now)
    result = SubmitResult()
    next_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0] + 1
    ev_rows: list[tuple[Any, ...]] = []
    dl_rows: list[tuple[Any, ...]] = []
    au_rows: list[audit.AuditRow] = []
    dd_rows: list[tuple[Any, ...]] = []
    wanted: dict[str, list[str]] = {}
    for ev, dedupe_key, _, _ in prepared:
        if dedupe_key is not None:
            wanted.setdefault(ev.source, []).append(dedupe_key)
    seen = _existing_dedupe(conn, wanted, now - dedupe_window_s) if wanted else {}
    for ev, dedupe_key, sinks, body in prepared:
        if dedupe_key is not None:
            k = (ev.source, dedupe_key)
            first = seen.get(k)
            if first is not None:
                result.ids.append(first)
                result.duplicates_by_source[ev.source] += 1
                continue
            seen[k] = ev.id  # a second copy in this same batch
            dd_rows.append((ev.source, dedupe_key, ev.id, now))
        result.ids.append(ev.id)
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
    insert_rows(conn, "deliveries(seq, sink, class, ordering_key)", dl_rows)
    insert_rows(conn, "dedupe(source, key, event_id, created_at)", dd_rows,
                verb="INSERT OR REPLACE")
    audit.insert_audit(conn, au_rows)
    return result


def insert_quarantine(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    conn.execute(
        "INSERT INTO quarantine(received_at, source, reason, detail, raw, meta) "
        "VALUES (?,?,?,?,?,?)",
        row,
    )


# --------------------------------------------------------------------------- delivery


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


def _delete_deliveries(conn: sqlite3.Connection, sink: str, seqs: Sequence[int]) -> None:
    for chunk in in_chunks(seqs):
        marks, params = in_list(chunk)
        conn.execute(f"DELETE FROM deliveries WHERE sink = ? AND seq IN ({marks})",
                     [sink, *params])


def apply_resolutions(
    conn: sqlite3.Connection, sink: str, resolutions: Sequence[Resolution]
) -> None:
    ts = audit.utc_iso()
    now = time.time()
    done: list[int] = []
    au_rows: list[audit.AuditRow] = []
    retries: list[tuple[Any, ...]] = []
    for r in resolutions:
        if r.kind in ("delivered", "duplicate"):
            done.append(r.seq)
            detail: dict[str, Any] = {"status": r.status}
            au_rows.append(audit.audit_row(
                "delivered", event_id=r.event_id, sink=sink, ts=ts, detail=detail,
                reason="duplicate: " + r.reason if r.kind == "duplicate" else None))
        elif r.kind == "retry":
            if not r.attempted and not r.next_at:
                continue  # never sent (shutdown, key blocked): nothing changes for the row
            retries.append((r.next_at, 1 if r.attempted else 0, r.reason[:500] or None,
                            r.seq, sink))
            if r.attempted:
                au_rows.append(audit.audit_row(
                    "retry", event_id=r.event_id, sink=sink, ts=ts, reason=r.reason[:500],
                    detail={"status": r.status, "next_attempt": audit.utc_iso(r.next_at)}))
        elif r.kind == "dead_letter":
            conn.execute(
                "INSERT INTO dead_letters(seq, sink, event_id, type, class, ordering_key, status,"
                " reason, response_body, attempts, dead_at) "
                "SELECT d.seq, d.sink, e.id, e.type, d.class, d.ordering_key, ?, ?, ?, "
                "d.attempts + ?, ? FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.seq = ? AND d.sink = ?",
                (r.status, r.reason[:2000], (r.body or "")[:MAX_BODY_CHARS] or None,
                 1 if r.attempted else 0, now, r.seq, sink),
            )
            conn.execute("DELETE FROM deliveries WHERE seq = ? AND sink = ?", (r.seq, sink))
            au_rows.append(audit.audit_row(
                "dead_lettered", event_id=r.event_id, sink=sink, ts=ts, reason=r.reason[:2000],
                detail={"status": r.status}))
        elif r.kind == "unrouted":
            conn.execute(
                "UPDATE deliveries SET next_at = ?, last_error = ? WHERE seq = ? AND sink = ?",
                (r.next_at, ("unrouted: " + r.reason)[:500], r.seq, sink),
            )
        else:
            raise ValueError(f"unknown resolution kind {r.kind!r}")
    if retries:  # rare outside outages, and an outage sends little (circuit breaker)
        conn.executemany(
            "UPDATE deliveries SET next_at = ?, attempts = attempts + ?, last_error = ? "
            "WHERE seq = ? AND sink = ?", retries)
    if done:
        _delete_deliveries(conn, sink, done)
        _gc_events(conn, done)
    audit.insert_audit(conn, au_rows)


# --------------------------------------------------------------------------- budget


def used_bytes(conn: sqlite3.Connection, path: str) -> int:
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    try:
        wal = os.path.getsize(path + "-wal")
    except OSError:
        wal = 0
    return int((pages - free) * page_size + wal)


def expire_low(conn: sqlite3.Connection, limit: int, inflight: frozenset[int]) -> int:
    """Delete the oldest ``low`` events (all their delivery rows); never other classes."""
    rows = conn.execute(
        "SELECT seq, id, ordering_key FROM events WHERE class = ? "
        "AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE seq = events.seq) "
        "ORDER BY seq LIMIT ?",
        (int(EventClass.low), limit + len(inflight)),
    ).fetchall()
    rows = [r for r in rows if r[0] not in inflight][:limit]
    if not rows:
        return 0
    conn.executemany("DELETE FROM deliveries WHERE seq = ?", [(r[0],) for r in rows])
    conn.executemany("DELETE FROM events WHERE seq = ?", [(r[0],) for r in rows])
    ts = audit.utc_iso()
    audit.insert_audit(conn, [
        audit.audit_row("expired", event_id=r[1], ts=ts, reason="disk budget: class low",
                        ordering_key=None)
        for r in rows
    ])
    return len(rows)


def prune(conn: sqlite3.Connection, *, dedupe_before: float, audit_before: str,
          quarantine_max_rows: int, limit: int = 20_000) -> dict[str, int]:
    """Age/size limits of the side tables; returns rows removed per table."""
    # rowid order is insertion order (INSERT OR REPLACE takes a new rowid): oldest first
    dedupe = conn.execute(
        "DELETE FROM dedupe WHERE rowid IN (SELECT rowid FROM dedupe ORDER BY rowid LIMIT ?) "
        "AND created_at < ?", (limit, dedupe_before)
    ).rowcount
    # seq and ts grow together, so the oldest rows are the first by seq: no ts index
    audit_rows = conn.execute(
        "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit ORDER BY seq LIMIT ?) "
        "AND ts < ?", (limit, audit_before)).rowcount
    quarantine = conn.execute(
        "DELETE FROM quarantine WHERE id <= "
        "(SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)", (quarantine_max_rows,)
    ).rowcount
    return {"dedupe": dedupe, "audit": audit_rows, "quarantine": quarantine}


def prune_finished_audit(conn: sqlite3.Connection, limit: int) -> tuple[int, str | None]:
    """Disk pressure: drop the oldest audit rows of events that left the outbox.

    Rows of events still queued or dead-lettered are never touched. Returns the number
    removed and the timestamp of the oldest audit row kept.
    """
    removed = conn.execute(
        "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE event_id IS NULL "
        "OR event_id NOT IN (SELECT id FROM events) ORDER BY seq LIMIT ?)", (limit,)
    ).rowcount
    oldest = conn.execute("SELECT ts FROM audit ORDER BY seq LIMIT 1").fetchone()
    return removed, oldest[0] if oldest else None


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
    """Depth per sink and class, oldest age, retrying, unrouted, dead letters, quarantine."""
    now = time.time()
    sinks: dict[str, dict[str, Any]] = {}

    def entry(sink: str) -> dict[str, Any]:
        return sinks.setdefault(sink, {
            "depth": {c.name: 0 for c in EventClass}, "total": 0, "retrying": 0,
            "unrouted": 0, "oldest_age_s": None, "dead_letters": 0,
        })

    for sink, cls, n in conn.execute(
        "SELECT sink, class, COUNT(*) FROM deliveries GROUP BY sink, class"
    ):
        e = entry(sink)
        e["depth"][EventClass(cls).name] = n
        e["total"] += n
    for sink, retrying, unrouted in conn.execute(
        "SELECT sink, SUM(attempts > 0), SUM(last_error LIKE 'unrouted:%') FROM deliveries "
        "WHERE attempts > 0 OR last_error IS NOT NULL GROUP BY sink"
    ):
        entry(sink)["retrying"] = retrying or 0
        entry(sink)["unrouted"] = unrouted or 0
    for sink in list(sinks):
        # The sink's oldest row is the smallest head of its class ranges in deliveries_ready
        # (four index probes); ORDER BY seq over the sink sorts its whole backlog.
        heads = [
            conn.execute("SELECT MIN(seq) FROM deliveries WHERE sink = ? AND class = ?",
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
                "WHERE d.sink = ? ORDER BY d.seq LIMIT 1", (sink,)
            ).fetchone()
        if row:
            sinks[sink]["oldest_age_s"] = round(max(0.0, now - row[0]), 3)
    for sink, n in conn.execute("SELECT sink, COUNT(*) FROM dead_letters GROUP BY sink"):
        entry(sink)["dead_letters"] = n
    quarantine = dict(conn.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason"))
    events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return {"sinks": sinks, "events": events, "quarantine": quarantine,
            "dead_letters": sum(s["dead_letters"] for s in sinks.values())}


_DLQ_COLS = ("id", "seq", "sink", "event_id", "type", "class", "ordering_key", "status",
             "reason", "response_body", "attempts", "dead_at")


def _dlq_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(_DLQ_COLS, row, strict=True))
    d["class"] = EventClass(d["class"]).name
    d["dead_at"] = audit.utc_iso(d["dead_at"])
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
    rows = _select_dlq(conn, ids, sink)
    ts = audit.utc_iso()
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
    ts = audit.utc_iso()
    conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(r[0],) for r in rows])
    _gc_events(conn, [r[1] for r in rows])
    audit.insert_audit(conn, [
        audit.audit_row("discarded", event_id=r[3], sink=r[2], actor=actor, reason=reason, ts=ts)
        for r in rows
    ])
    return len(rows)


def queued_sinks(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT DISTINCT sink FROM deliveries")]


def reroute_sink(conn: sqlite3.Connection, *, from_sink: str, to_sink: str, actor: str,
                 reason: str) -> int:
    """Move every queued row of ``from_sink`` (e.g. removed from config) to ``to_sink``."""
    rows = conn.execute(
        "SELECT d.seq, e.id FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.sink = ?",
        (from_sink,),
    ).fetchall()
    conn.execute(
        "INSERT OR IGNORE INTO deliveries(seq, sink, class, ordering_key) "
        "SELECT seq, ?, class, ordering_key FROM deliveries WHERE sink = ?",
        (to_sink, from_sink),
    )
    conn.execute("DELETE FROM deliveries WHERE sink = ?", (from_sink,))
    ts = audit.utc_iso()
    audit.insert_audit(conn, [
        audit.audit_row("rerouted", event_id=eid, sink=to_sink, actor=actor, reason=reason,
                        ts=ts, detail={"from": from_sink})
        for _, eid in rows
    ])
    return len(rows)


def discard_sink(conn: sqlite3.Connection, *, sink: str, actor: str, reason: str) -> int:
    """Drop every queued row of ``sink`` (operator decision, audited per event)."""
    rows = conn.execute(
        "SELECT d.seq, e.id FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.sink = ?",
        (sink,),
    ).fetchall()
    conn.execute("DELETE FROM deliveries WHERE sink = ?", (sink,))
    _gc_events(conn, [r[0] for r in rows])
    ts = audit.utc_iso()
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
        {"sink": s, "attempts": a, "next_at": audit.utc_iso(n) if n else None, "last_error": e}
        for s, a, n, e in conn.execute(
            "SELECT sink, attempts, next_at, last_error FROM deliveries WHERE seq = ?", (row[0],)
        )
    ]
    return {"event": orjson.loads(row[1]), "pending": pending}
