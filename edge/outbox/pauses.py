"""A sink's pauses that must outlive the process, kept in the outbox's ``meta`` table.

Two pauses of a sink survive a restart (``edge.forwarder`` restores them when it starts):
- ``sink_pause:<sink>``: the dead-letter storm guard's pause, as JSON ``{"code",
  "reason", "since", "key"}``. It stays until an operator resumes the sink: ``clear_pause``
  runs in the transaction of the ``sink_resumed`` audit row, ``store_pause`` in the one of
  the ``sink_paused`` row.
- ``sink_retry_after:<sink>``: the end of the pause a receiver asked for with
  ``Retry-After``, as JSON ``{"until", "for_s"}`` (``until`` in epoch seconds of
  ``edge.retry.steady_time``, ``for_s`` the delay the receiver gave). Written with the
  outcomes that carried it; removed once its time has passed.

A pause of refused credentials (401/403) is not kept: the sink probes again after a
restart and finds out at once. No schema change: ``meta`` is a key/value table every
version has. A row of a sink that is no longer configured is kept (and used again if the
sink comes back), like the sink's queued rows.

All functions take a ``sqlite3.Connection``; the writing ones expect the caller's write
transaction (the group-commit writer, or ``queries.transaction`` in the CLI).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from edge.outbox import audit
from edge.timefmt import utc_iso

__all__ = ["clear_pause", "keep_retry_after", "load_pauses", "resume_stopped",
           "retry_after_until", "settle_retry_after", "store_pause"]

PAUSE_PREFIX = "sink_pause:"
RETRY_AFTER_PREFIX = "sink_retry_after:"


def load_pauses(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Every stored pause by sink: ``{"storm_guard": {...}, "retry_after": {...}}`` (either
    may be missing). A value that cannot be read is skipped, never fatal at start."""
    out: dict[str, dict[str, Any]] = {}
    rows = conn.execute(r"SELECT key, value FROM meta WHERE key LIKE 'sink\_%' ESCAPE '\'"
                        ).fetchall()
    for key, value in rows:
        for prefix, kind in ((PAUSE_PREFIX, "storm_guard"), (RETRY_AFTER_PREFIX, "retry_after")):
            if key.startswith(prefix):
                try:
                    doc = orjson.loads(value)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(doc, dict):
                    out.setdefault(key[len(prefix):], {})[kind] = doc
    return out


def store_pause(conn: sqlite3.Connection, sink: str, pause: dict[str, Any]) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                 (PAUSE_PREFIX + sink, orjson.dumps(pause).decode()))


def clear_pause(conn: sqlite3.Connection, sink: str) -> dict[str, Any] | None:
    """Remove the sink's stored storm-guard pause; return it (None when there was none)."""
    row = conn.execute("DELETE FROM meta WHERE key = ? RETURNING value",
                       (PAUSE_PREFIX + sink,)).fetchone()
    if row is None:
        return None
    try:
        doc = orjson.loads(row[0])
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def keep_retry_after(conn: sqlite3.Connection, sink: str, until: float, for_s: float,
                     now: float) -> None:
    """Keep the later of the stored and the given Retry-After end; remove it once ``now``
    has reached it. Lanes complete in any order: an earlier end never replaces a later one."""
    key = RETRY_AFTER_PREFIX + sink
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is not None:
        try:
            stored = orjson.loads(row[0])
            if isinstance(stored, dict) and float(stored["until"]) > until:
                until, for_s = float(stored["until"]), float(stored.get("for_s", for_s))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # unreadable: replaced by the given end
    if until <= now:
        conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    else:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                     (key, orjson.dumps({"until": until, "for_s": for_s}).decode()))


def settle_retry_after(conn: sqlite3.Connection, now: float) -> None:
    """At start: remove the Retry-After ends ``now`` has reached, and bring an end more
    than its ``for_s`` ahead of ``now`` back to ``now + for_s``.

    The end is in ``steady_time`` seconds of the run that stored it, and each run's
    ``steady_time`` starts from the wall clock it reads at start. So a step of the wall
    clock while the gateway is stopped moves the end with it: stepped forward by X, the
    pause ends X sooner (or is already over: the sink sends at once, which is all a stopped
    gateway's downtime can do to it anyway); stepped back by X, it would last X longer,
    which is why it is capped at the delay the receiver asked for, counted from this start.
    A running gateway's pause does not move with a step (``steady_time``)."""
    for key, doc in _retry_after_rows(conn):
        until = retry_after_until(doc)
        for_s = _float(doc, "for_s")
        capped = min(until, now + for_s)
        if capped <= now:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        elif capped < until:
            conn.execute("UPDATE meta SET value = ? WHERE key = ?",
                         (orjson.dumps({"until": capped, "for_s": for_s}).decode(), key))


def _retry_after_rows(conn: sqlite3.Connection) -> list[tuple[str, Any]]:
    rows = conn.execute(r"SELECT key, value FROM meta WHERE key LIKE 'sink\_retry\_after:%' "
                        r"ESCAPE '\'").fetchall()
    out = []
    for key, value in rows:
        try:
            out.append((key, orjson.loads(value)))
        except orjson.JSONDecodeError:
            out.append((key, None))
    return out


def retry_after_until(doc: Any) -> float:
    """The end of a stored Retry-After pause (0.0 when unreadable)."""
    return _float(doc, "until")



def _float(doc: Any, name: str) -> float:
    """A number of a stored document; 0.0 when unreadable (a Retry-After then counts as
    over: the sink sends, and the receiver says so again if it must)."""
    try:
        return float(doc[name])
    except (KeyError, TypeError, ValueError):
        return 0.0


def resume_stopped(conn: sqlite3.Connection, sink: str, *, actor: str, reason: str
                   ) -> dict[str, Any] | None:
    """``edge sink resume`` while the gateway is stopped: remove the sink's stored
    storm-guard pause and write the ``sink_resumed`` audit row, in the caller's
    transaction. Returns the pause that was lifted, or None when the sink was not paused
    (nothing is written then)."""
    pause = clear_pause(conn, sink)
    if pause is None:
        return None
    detail: dict[str, Any] = {"sink": sink, "pause": pause.get("code", "storm_guard"),
                              "gateway": "stopped"}
    if isinstance(pause.get("since"), int | float):
        detail["paused_since"] = utc_iso(float(pause["since"]))
    if pause.get("reason"):
        detail["pause_reason"] = pause["reason"]
    audit.insert_audit(conn, [audit.audit_row("sink_resumed", actor=actor, reason=reason,
                                              detail=detail)])
    return pause
