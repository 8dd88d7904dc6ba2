"""Dead letters grouped by why the receiver refused them, for the status page.

``by_reason(conn)`` runs on the outbox's reader thread (``Outbox.read``): the most frequent
(sink, status, reason) groups first, each with its count, latest time, and the id and the
start of the receiver's answer of its latest dead letter, so the page can say
"12 × HTTP 422 — {"error": "order is closed"} (erp, #40)".
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["by_reason"]

MAX_REASON_CHARS = 300  # a reason can quote a whole response; the page needs its start
MAX_BODY_CHARS = 300


def by_reason(conn: sqlite3.Connection, limit: int = 5) -> dict[str, Any]:
    """``{"total": n, "groups": [{sink, status, reason, count, latest_id, latest_at,
    response}]}``, at most ``limit`` groups, the largest first (then the most recent);
    ``response``: the start of the latest one's response body (``""`` when none)."""
    total = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    rows = conn.execute(
        "SELECT sink, status, substr(reason, 1, ?), COUNT(*), MAX(id), MAX(dead_at) "
        "FROM dead_letters GROUP BY sink, status, substr(reason, 1, ?) "
        "ORDER BY COUNT(*) DESC, MAX(id) DESC LIMIT ?",
        (MAX_REASON_CHARS, MAX_REASON_CHARS, limit)).fetchall()
    groups = []
    for sink, status, reason, count, latest_id, latest_at in rows:
        body = conn.execute("SELECT substr(response_body, 1, ?) FROM dead_letters WHERE id = ?",
                            (MAX_BODY_CHARS, latest_id)).fetchone()
        groups.append({"sink": sink, "status": status, "reason": reason, "count": int(count),
                       "latest_id": int(latest_id), "latest_at": float(latest_at),
                       "response": (body[0] if body else None) or ""})
    return {"total": int(total), "groups": groups}
