"""The lineage of an event ("where is record X"): audit trail + stored event + what is left.

Read-only functions over an outbox ``sqlite3.Connection``, used by ``GET /trace`` (on the
daemon's reader thread) and by ``edge trace`` (on the file directly). Each document is read
in one short read transaction, so it is a consistent snapshot. No web framework here.

Document of one event::

    {"event_id", "event" (stored body or null once delivered everywhere),
     "pending": [{sink, attempts, next_at, last_error}], "dead_letters": [...],
     "sinks": {sink: current state}, "audit": [audit rows, oldest first]}
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from edge.outbox import audit, queries
from edge.timefmt import utc_iso

__all__ = ["format_timeline", "trace_event", "trace_key"]

_FINAL = {"delivered", "discarded", "expired", "rerouted", "dead_lettered", "replayed"}


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _dead_letters(conn: sqlite3.Connection, event_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT id, sink, status, reason, attempts, dead_at FROM dead_letters "
        "WHERE event_id = ? ORDER BY id", (event_id,)).fetchall()
    return [{"id": i, "sink": s, "status": st, "reason": r, "attempts": a,
             "dead_at": utc_iso(t)} for i, s, st, r, a, t in rows]


def _document(conn: sqlite3.Connection, event_id: str, rows: list[dict[str, Any]]
              ) -> dict[str, Any]:
    stored = queries.event_by_id(conn, event_id)
    pending = stored["pending"] if stored else []
    dead = _dead_letters(conn, event_id)
    return {"event_id": event_id, "event": stored["event"] if stored else None,
            "pending": pending, "dead_letters": dead, "sinks": _sink_states(rows, pending, dead),
            "audit": rows}


def _sink_states(rows: list[dict[str, Any]], pending: list[dict[str, Any]],
                 dead: list[dict[str, Any]]) -> dict[str, str]:
    """Where the event is now, per sink: the tables first, the trail for what has left."""
    states: dict[str, str] = {}
    for row in rows:
        if row["state"] == "stored":
            for sink in (row.get("detail") or {}).get("sinks", []):
                states.setdefault(sink, "queued")
        elif row["state"] == "expired":
            states = dict.fromkeys(states, "expired") or {"*": "expired"}
        elif row["sink"] and row["state"] in _FINAL:
            states[row["sink"]] = row["state"]
    for d in dead:
        states[d["sink"]] = "dead_lettered"
    for p in pending:
        states[p["sink"]] = f"retrying ({p['attempts']} attempts)" if p["attempts"] else "queued"
    return states


def trace_event(conn: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
    """The lineage of one event, or None when the outbox never saw it."""
    with _snapshot(conn):
        rows = audit.trace_event(conn, event_id)
        doc = _document(conn, event_id, rows)
    if not rows and doc["event"] is None and not doc["dead_letters"]:
        return None
    return doc


def trace_key(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    """The lineage of every event stored under ``ordering_key`` (oldest first)."""
    with _snapshot(conn):
        by_event: dict[str, list[dict[str, Any]]] = {}
        for row in audit.trace_key(conn, key):
            by_event.setdefault(row["event_id"], []).append(row)
        events = [_document(conn, eid, rows) for eid, rows in by_event.items()]
    if not events:
        return None
    return {"key": key, "events": events}


# --------------------------------------------------------------------------- text


def format_timeline(doc: dict[str, Any]) -> list[str]:
    """A readable timeline of one event document (``trace_event``)."""
    rows = doc["audit"]
    head = next((r for r in rows if r["state"] in ("stored", "unrouted")), None)
    d = (head or {}).get("detail") or {}
    ev = doc.get("event") or {}
    key = ev.get("ordering_key") or (head or {}).get("ordering_key")
    lines = [f"event {doc['event_id']}  {d.get('type') or ev.get('type', '?')}"
             f"  class {d.get('class') or ev.get('class', '?')}"
             f"  key {key or '-'}  from {d.get('source') or ev.get('source', '?')}"]
    for r in rows:
        lines.append(f"  {r['ts'].replace('T', ' ')}  {r['sink'] or '':<12} {_describe(r)}")
    now = ", ".join(f"{s}: {st}" for s, st in doc["sinks"].items()) or "unknown"
    lines.append(f"  now: {now}")
    for p in doc["pending"]:
        if p["last_error"]:
            lines.append(f"  {p['sink']}: last error {p['last_error']}; next attempt "
                         f"{p['next_at'] or 'now'}")
    for dl in doc["dead_letters"]:
        lines.append(f"  {dl['sink']}: dead letter #{dl['id']} (HTTP {dl['status']}): "
                     f"replay with `edge dlq replay {dl['id']} --reason ...`")
    return lines


def _describe(r: dict[str, Any]) -> str:
    state, d, reason = r["state"], r.get("detail") or {}, r.get("reason")
    if state == "stored":
        sinks = ", ".join(d.get("sinks", [])) or "-"
        return f"stored (received and committed) for {sinks}; sha256 {str(d.get('sha256'))[:12]}"
    if state == "unrouted":
        return f"not stored: {reason or 'no sink route for its type'}"
    if state == "retry":
        return (f"attempt failed, will retry: {_status(d, reason)}{reason or ''}; next attempt "
                f"{d.get('next_attempt', '?')}")
    if state == "delivered":
        return f"delivered ({_status(d).strip()})" + (f"; {reason}" if reason else "")
    if state == "dead_lettered":
        return f"dead-lettered: {_status(d, reason)}{reason or ''}"
    if state in ("replayed", "discarded", "rerouted"):
        extra = f" from {d['from']}" if d.get("from") else ""
        return f"{state}{extra} by {r['actor']}: \"{reason or ''}\""
    text = state + (f": {reason}" if reason else "")
    return text + (f" (by {r['actor']})" if r.get("actor") not in (None, "gateway") else "")


def _status(d: dict[str, Any], reason: str | None = None) -> str:
    """``HTTP 422 `` unless the reason already starts with it."""
    if d.get("status") is None:
        return ""
    text = f"HTTP {d['status']} "
    return "" if (reason or "").startswith(text.strip()) else text
