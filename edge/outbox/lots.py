"""The ``lots`` and ``capa_counts`` tables: lot state and CAPA counts, kept with the events.

Write functions assume the caller holds the write transaction (the group-commit writer, or
``queries.transaction`` in the CLI), so a lot's state changes in the same transaction as
the events that change it: ``apply_changes`` is called by ``queries.insert_events`` with
the changes of the items it stored, and writes one audit row per change of a lot's state
(``lot_hold``, ``lot_released``, ``lot_quarantine``, ``lot_rejected``; ``lot_pending``
for a failure that still needs its episode) with who decided, under the id of the event
that carried the change. Every row written takes the
next revision (``meta.quality_rev``), so the in-memory cache can tell newer from older.

What a change does is decided by ``edge.quality.state`` (pure functions shared with the
rules' view); this module only loads, stores and reads rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge.outbox import audit
from edge.quality.state import (
    CapaChange,
    CapaRow,
    Change,
    LotChange,
    LotRow,
    apply_capa,
    apply_lot,
)
from edge.timefmt import utc_iso

__all__ = [
    "Applied",
    "apply_changes",
    "get_lot",
    "in_transit",
    "list_lots",
    "load_state",
    "notification_failures",
    "prune",
    "summary",
    "undelivered_by_type",
]

_LOT_COLS = ("lot_id", "state", "episode", "supplier", "info", "first_seen", "opened_at",
             "decided_at", "decided_by", "reason", "failures", "last_type", "last_event_id",
             "last_at", "last", "pending", "updated_at", "rev")
_CAPA_COLS = ("rule", "grp", "threshold", "window_s", "times", "last_start", "last_capa_id",
              "requests", "updated_at", "rev")
_JSON_LOT = {"info", "last", "pending"}


@dataclass
class Applied:
    """The rows a transaction wrote (for the cache, after COMMIT)."""

    lots: list[LotRow] = field(default_factory=list)
    capa: list[CapaRow] = field(default_factory=list)


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _lot(row: Sequence[Any], cols: Sequence[str] = _LOT_COLS) -> LotRow:
    d = dict(zip(cols, row, strict=True))
    for k in _JSON_LOT & d.keys():
        d[k] = orjson.loads(d[k]) if d[k] else None
    d["info"] = d.get("info") or {}
    return LotRow(**d)


def _capa(row: Sequence[Any]) -> CapaRow:
    d = dict(zip(_CAPA_COLS, row, strict=True))
    group = tuple(orjson.loads(d.pop("grp")))
    d["times"] = orjson.loads(d["times"])
    return CapaRow(group=group, **d)


def get_lot(conn: sqlite3.Connection, lot_id: str) -> LotRow | None:
    row = conn.execute(f"SELECT {', '.join(_LOT_COLS)} FROM lots WHERE lot_id = ?",
                       (lot_id,)).fetchone()
    return _lot(row) if row else None


def load_state(conn: sqlite3.Connection) -> tuple[list[LotRow], list[CapaRow]]:
    """Every lot (without ``last``) and every CAPA row, for the cache at open."""
    cols = [c for c in _LOT_COLS if c != "last"]
    lots = [_lot(r, cols) for r in conn.execute(f"SELECT {', '.join(cols)} FROM lots")]
    capa = [_capa(r) for r in conn.execute(f"SELECT {', '.join(_CAPA_COLS)} FROM capa_counts")]
    return lots, capa


def _get_capa(conn: sqlite3.Connection, rule: str, group: tuple[str, ...]) -> CapaRow | None:
    row = conn.execute(f"SELECT {', '.join(_CAPA_COLS)} FROM capa_counts WHERE rule = ? "
                       "AND grp = ?", (rule, _dumps(list(group)))).fetchone()
    return _capa(row) if row else None


def _next_rev(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'quality_rev'").fetchone()
    rev = (int(row[0]) if row else 0) + 1
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('quality_rev', ?)", (str(rev),))
    return rev


def apply_changes(conn: sqlite3.Connection, changes: Sequence[Change], now: float | None = None
                  ) -> Applied:
    """Apply ``changes`` in order to the stored rows; write the rows and the audit rows of
    every state change; return the rows written."""
    if not changes:
        return Applied()
    lots: dict[str, LotRow] = {}
    capa: dict[tuple[str, tuple[str, ...]], CapaRow] = {}
    au_rows: list[audit.AuditRow] = []
    ts = utc_iso(now)
    for ch in changes:
        if isinstance(ch, LotChange):
            old = lots.get(ch.lot_id)
            if old is None:
                old = get_lot(conn, ch.lot_id)
                if old is not None and old.last is None:
                    old.last = {}
            before = (old.state, old.episode, old.pending) if old is not None else None
            new = apply_lot(old, ch, own=True)  # rows read in this call are its own
            if new.last is None:
                new.last = {ch.event_type: [ch.event_id, ch.at]}
            lots[ch.lot_id] = new
            au_rows.extend(_audit(before, new, ch, ts))
        elif isinstance(ch, CapaChange):
            key = (ch.rule, ch.group)
            c_old = capa.get(key) or _get_capa(conn, *key)
            capa[key] = apply_capa(c_old, ch, own=True)
    rev = _next_rev(conn)
    for r in lots.values():
        r.rev = rev
    for c in capa.values():
        c.rev = rev
    if lots:
        conn.executemany(
            f"INSERT OR REPLACE INTO lots({', '.join(_LOT_COLS)}) "
            f"VALUES ({', '.join('?' * len(_LOT_COLS))})",
            [tuple(_dumps(getattr(r, c)) if c in _JSON_LOT else getattr(r, c)
                   for c in _LOT_COLS) for r in lots.values()])
    if capa:
        conn.executemany(
            f"INSERT OR REPLACE INTO capa_counts({', '.join(_CAPA_COLS)}) "
            f"VALUES ({', '.join('?' * len(_CAPA_COLS))})",
            [(c.rule, _dumps(list(c.group)), c.threshold, c.window_s, _dumps(c.times),
              c.last_start, c.last_capa_id, c.requests, c.updated_at, c.rev)
             for c in capa.values()])
    audit.insert_audit(conn, au_rows)
    return Applied(list(lots.values()), list(capa.values()))


def _audit(before: tuple[str, int, Any] | None, new: LotRow, ch: LotChange, ts: str
           ) -> list[audit.AuditRow]:
    """Audit rows for the change of a lot from ``before`` (state, episode, pending)."""
    out = []
    key = f"lot:{new.lot_id}"
    was = before[:2] if before is not None else ("unknown", 0)
    if was != (new.state, new.episode):  # a lot seen first is no decision: no row
        out.append(audit.audit_row(
            f"lot_{new.state}", event_id=ch.event_id, actor=ch.actor, reason=new.reason,
            ordering_key=key, ts=ts,
            detail={"lot_id": new.lot_id, "episode": new.episode,
                    "from": before[0] if before is not None else None,
                    "decided_by": new.decided_by, "type": ch.event_type}))
    if new.pending is not None and (before is None or before[2] is None):
        out.append(audit.audit_row(
            "lot_pending", event_id=ch.event_id, actor=ch.actor, ordering_key=key, ts=ts,
            reason="a failing result was stored after a release: a new episode follows",
            detail={"lot_id": new.lot_id, "episode": new.episode,
                    "failure": new.pending.get("event_id")}))
    return out


# --------------------------------------------------------------------------- reading

def lot_dict(r: LotRow, now: float, stuck_after_s: float | None = None) -> dict[str, Any]:
    """A lot as ``/status``, ``GET /lots`` and ``edge lots --json`` show it."""
    since = _since(r)
    d: dict[str, Any] = {
        "lot_id": r.lot_id, "state": r.state, "episode": r.episode, "supplier": r.supplier,
        "failures": r.failures, "first_seen": utc_iso(r.first_seen),
        "opened_at": utc_iso(r.opened_at) if r.opened_at else None,
        "decided_at": utc_iso(r.decided_at) if r.decided_at else None,
        "decided_by": r.decided_by, "reason": r.reason,
        "last_event": ({"type": r.last_type, "id": r.last_event_id,
                        "at": utc_iso(r.last_at) if r.last_at else None}
                       if r.last_type else None),
        "since": utc_iso(since), "age_s": round(max(0.0, now - since), 1),
        "pending": r.pending is not None,
    }
    if r.last:
        d["last_events"] = {t: {"id": v[0], "at": utc_iso(v[1])} for t, v in r.last.items()}
    if r.info:
        d["info"] = r.info
    if stuck_after_s is not None:
        d["stuck"] = is_stuck(r, now, stuck_after_s)
    return d


def _since(r: LotRow) -> float:
    """Since when the lot is in its state: first seen (no disposition yet), its episode's
    opening (hold), or its last decision."""
    if r.state == "unknown":
        return r.first_seen
    if r.state == "hold" and r.opened_at:
        return r.opened_at
    return r.decided_at or r.updated_at


def is_stuck(r: LotRow, now: float, stuck_after_s: float) -> bool:
    """No disposition (``unknown``) or held without a decision since, for too long."""
    return r.state in ("unknown", "hold") and now - _since(r) > stuck_after_s


def list_lots(conn: sqlite3.Connection, *, now: float, state: str | None = None,
              stuck_after_s: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Lots, most recently changed first."""
    sql = f"SELECT {', '.join(_LOT_COLS)} FROM lots"
    args: list[Any] = []
    if state:
        sql += " WHERE state = ?"
        args.append(state)
    sql += " ORDER BY updated_at DESC LIMIT ?"
    args.append(limit)
    return [lot_dict(_lot(r), now, stuck_after_s) for r in conn.execute(sql, args)]


def summary(conn: sqlite3.Connection, *, now: float, stuck_after_s: float,
            shown: int = 20) -> dict[str, Any]:
    """The ``lots`` section of ``/status``: counts by state and the stuck lots (oldest
    first, at most ``shown`` of them)."""
    counts = dict(conn.execute("SELECT state, COUNT(*) FROM lots GROUP BY state").fetchall())
    cutoff = now - stuck_after_s
    # stuck: unknown since first seen, or on hold since the episode opened, before cutoff
    where = ("(state = 'unknown' AND first_seen < ?) OR "
             "(state = 'hold' AND COALESCE(opened_at, updated_at) < ?)")
    stuck_n = conn.execute(f"SELECT COUNT(*) FROM lots WHERE {where}",
                           (cutoff, cutoff)).fetchone()[0]
    rows = conn.execute(
        f"SELECT {', '.join(_LOT_COLS)} FROM lots WHERE {where} "
        "ORDER BY CASE state WHEN 'unknown' THEN first_seen "
        "ELSE COALESCE(opened_at, updated_at) END LIMIT ?", (cutoff, cutoff, shown)).fetchall()
    return {
        "total": sum(counts.values()),
        "by_state": {s: counts.get(s, 0) for s in ("unknown", "hold", "quarantine",
                                                    "rejected", "released")},
        "stuck_after_s": stuck_after_s,
        "stuck": stuck_n,
        "stuck_lots": [lot_dict(_lot(r), now, stuck_after_s) for r in rows],
        "pending": conn.execute("SELECT COUNT(*) FROM lots WHERE pending IS NOT NULL"
                                ).fetchone()[0],
        # delayed dispositions: on hold since the episode opened, no decision since
        "delayed_dispositions": conn.execute(
            "SELECT COUNT(*) FROM lots WHERE state = 'hold' AND "
            "COALESCE(opened_at, updated_at) < ?", (cutoff,)).fetchone()[0],
    }


# --------------------------------------------------------------------------- business monitors

def undelivered_by_type(conn: sqlite3.Connection, types: Sequence[str], *, now: float
                        ) -> dict[str, dict[str, dict[str, Any]]]:
    """For each of ``types``: per sink, the events still undelivered (queued, retrying,
    unrouted, parked: every delivery row) — ``{type: {sink: {"waiting", "oldest_age_s",
    "oldest_event_id"}}}``; a type with nothing waiting is absent. Age counts from ingest."""
    if not types:
        return {}
    marks = ", ".join("?" * len(types))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for type_, sink, waiting, oldest in conn.execute(
            f"SELECT e.type, d.sink, COUNT(*), MIN(e.received_at) FROM deliveries d "
            f"JOIN events e ON e.seq = d.seq WHERE e.type IN ({marks}) AND d.done = 0 "
            "GROUP BY e.type, d.sink", list(types)):
        row = conn.execute(
            "SELECT e.id FROM deliveries d JOIN events e ON e.seq = d.seq "
            "WHERE d.sink = ? AND e.type = ? AND d.done = 0 ORDER BY e.received_at LIMIT 1",
            (sink, type_)).fetchone()
        out.setdefault(type_, {})[sink] = {
            "waiting": waiting, "oldest_age_s": round(max(0.0, now - oldest), 1),
            "oldest_event_id": row[0] if row else None}
    return out


def notification_failures(conn: sqlite3.Connection, types: Sequence[str], *, shown: int = 20
                          ) -> dict[str, Any]:
    """Dead letters of ``types`` (supplier cases, notifications, CAPA requests), newest
    first, and how many of them are still retrying after a failed attempt."""
    if not types:
        return {"dead_letters": 0, "retrying": 0, "items": [], "retrying_items": []}
    marks = ", ".join("?" * len(types))
    dead = conn.execute(f"SELECT COUNT(*) FROM dead_letters WHERE type IN ({marks})",
                        list(types)).fetchone()[0]
    items = [{"dead_letter_id": i, "sink": sink, "event_id": ev, "type": t, "status": st,
              "reason": reason, "ordering_key": key, "dead_at": utc_iso(at)}
             for i, sink, ev, t, st, reason, key, at in conn.execute(
                 "SELECT id, sink, event_id, type, status, reason, ordering_key, dead_at "
                 f"FROM dead_letters WHERE type IN ({marks}) ORDER BY id DESC LIMIT ?",
                 (*types, shown))]
    retrying_sql = (f"FROM deliveries d JOIN events e ON e.seq = d.seq WHERE e.type IN "
                    f"({marks}) AND (d.attempts > 0 OR d.last_error IS NOT NULL) AND d.done = 0")
    retrying = conn.execute(f"SELECT COUNT(*) {retrying_sql}", list(types)).fetchone()[0]
    retrying_items = [{"sink": sink, "event_id": ev, "type": t, "attempts": n,
                       "last_error": err, "ordering_key": key}
                      for sink, ev, t, n, err, key in conn.execute(
                          "SELECT d.sink, e.id, e.type, d.attempts, d.last_error, "
                          f"e.ordering_key {retrying_sql} ORDER BY d.seq LIMIT ?",
                          (*types, shown))]
    return {"dead_letters": dead, "retrying": retrying, "items": items,
            "retrying_items": retrying_items}


_STATUS_TYPES = ("lot.status", "quality.hold", "quality.release")


def in_transit(conn: sqlite3.Connection, lot_ids: Sequence[str], sinks: Sequence[str]
               ) -> set[tuple[str, str]]:
    """(lot, sink) pairs where a lot's status (``lot.status``, ``quality.hold``,
    ``quality.release``) is still on its way to the sink (queued or retrying): what the
    system answers about that lot may not know it yet."""
    if not lot_ids or not sinks:
        return set()
    out: set[tuple[str, str]] = set()
    keys = {f"lot:{lot}": lot for lot in lot_ids}
    smarks = ", ".join("?" * len(sinks))
    tmarks = ", ".join("?" * len(_STATUS_TYPES))
    key_list = list(keys)
    for i in range(0, len(key_list), 500):
        chunk = key_list[i:i + 500]
        kmarks = ", ".join("?" * len(chunk))
        for key, sink in conn.execute(
                f"SELECT DISTINCT d.ordering_key, d.sink FROM deliveries d "
                f"JOIN events e ON e.seq = d.seq WHERE d.sink IN ({smarks}) "
                f"AND d.ordering_key IN ({kmarks}) AND e.type IN ({tmarks}) AND d.done = 0",
                (*sinks, *chunk, *_STATUS_TYPES)):
            out.add((keys[key], sink))
    return out


# --------------------------------------------------------------------------- pruning

def prune(conn: sqlite3.Connection, *, now: float, lots_before: float,
          limit: int = 5000) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """Forget released and rejected lots unchanged since ``lots_before``, and CAPA rows with
    nothing counted within their window; return what was removed (for the cache)."""
    gone = [r[0] for r in conn.execute(
        "DELETE FROM lots WHERE lot_id IN (SELECT lot_id FROM lots "
        "WHERE state IN ('released', 'rejected') AND updated_at < ? LIMIT ?) "
        "AND pending IS NULL RETURNING lot_id", (lots_before, limit))]
    capa = [(r[0], tuple(orjson.loads(r[1]))) for r in conn.execute(
        "DELETE FROM capa_counts WHERE updated_at < ? - window_s RETURNING rule, grp",
        (now,))]
    return gone, capa
