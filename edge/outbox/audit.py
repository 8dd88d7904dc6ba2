"""The audit trail: an append-only record of every state change of every event.

Rows live in the outbox database and are written in the SAME transaction as the change they
describe, so the trail can never disagree with the outbox. ``seq`` (AUTOINCREMENT) is the
monotonic sequence; ``ts`` is UTC ISO-8601 with microseconds.

States of an event (``state`` column):
  stored        received from a source and committed (detail: type, class, source, sha256,
                sinks); the ingest record, payload SHA-256 included
  unrouted      received but no sink has a route for its type (not stored; counted)
  delivered     the sink confirmed (detail: status, attempts); ``duplicate`` when the
                receiver said it already had it (409 ...)
  retry         an attempt failed and will be retried (reason, status, next attempt)
  dead_lettered moved to the dead-letter table (status, reason)
  expired       removed by the `low` class disk policy
  replayed      an operator moved a dead letter back to the queue (actor, reason)
  discarded     an operator removed a dead letter or an orphaned row (actor, reason)
  rerouted      an operator moved rows of a removed sink to another sink (actor, reason)
Component events (``event_id`` NULL): source gaps, reconnects, corrupt-file quarantine.

Retention: rows older than ``outbox.audit_retention_days`` are pruned (the one deliberate
exception to append-only, so the disk stays bounded); export them first if an auditor needs
longer.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from edge.outbox.sqlutil import insert_rows
from edge.timefmt import utc_iso

__all__ = ["AuditRow", "audit_row", "insert_audit", "trace_event", "trace_key"]

AuditRow = tuple[str, str | None, str | None, str, str, str | None, str | None, str | None]


def audit_row(
    state: str,
    *,
    event_id: str | None = None,
    sink: str | None = None,
    actor: str = "gateway",
    reason: str | None = None,
    ordering_key: str | None = None,
    detail: dict[str, Any] | None = None,
    ts: str | None = None,
) -> AuditRow:
    return (
        ts or utc_iso(),
        event_id,
        sink,
        state,
        actor,
        reason,
        ordering_key,
        orjson.dumps(detail).decode() if detail else None,
    )


def insert_audit(conn: sqlite3.Connection, rows: list[AuditRow]) -> None:
    insert_rows(conn, "audit(ts, event_id, sink, state, actor, reason, ordering_key, detail)",
                rows)


_COLUMNS = ("seq", "ts", "event_id", "sink", "state", "actor", "reason", "ordering_key", "detail")


def _as_dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    out = []
    for row in cur:
        d = dict(zip(_COLUMNS, row, strict=True))
        if d["detail"]:
            d["detail"] = orjson.loads(d["detail"])
        out.append(d)
    return out


def trace_event(conn: sqlite3.Connection, event_id: str) -> list[dict[str, Any]]:
    """Every audit row of one event, in sequence order."""
    return _as_dicts(
        conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE event_id = ? ORDER BY seq",
            (event_id,),
        )
    )


def trace_key(conn: sqlite3.Connection, key: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Audit rows of every event stored under ``ordering_key`` (newest events last)."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT event_id FROM audit WHERE ordering_key = ? ORDER BY seq DESC LIMIT ?",
            (key, limit),
        )
    ]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    return _as_dicts(
        conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE event_id IN ({marks}) ORDER BY seq",
            ids,
        )
    )
