"""The lease scan: which rows a sink's forwarder may send next.

Rules (DESIGN invariants 4 and 5):
- Priority: rows are considered in (class, seq) order — critical first, oldest first.
- Per-key FIFO: a row with an ``ordering_key`` is eligible only if every earlier row of the
  same key for this sink is eligible too and goes in the same lease (or was delivered).
  When the scan meets a key it walks that key's chain from its head, so a critical event
  pulls the earlier events of its lot forward instead of overtaking them ("priority
  inheritance"). A chain stops at the first row in flight or waiting for a retry: that
  key is blocked, other keys flow.
- Live-first: when the lease is full before the scan ran out (a backlog), ``live_limit``
  rows are taken from the newest end so fresh events reach dashboards while draining.
- Parked keys: a key with a dead letter for this sink is blocked altogether (``parked``;
  the forwarder passes it unless the sink's ``on_dead_letter`` is ``continue``) until an
  operator replays or discards the dead letter.
- ``not_before``: seq → earliest send time the outbox keeps in memory when recording an
  outcome failed (DESIGN: a retry is never early, even when its ``next_at`` was not saved).
- Bounded work: at most ``max_scan`` rows are considered per lease. Rows waiting for a
  retry are passed over inside SQLite (``next_at`` filter), not one by one here: a keyed
  one still blocks its key, found when the chain of a later row of that key is walked.

Pure functions over a sqlite3 connection; they run on a reader thread and never write.
Rows are returned sorted by seq, so per-key order is also the order within the lease.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from edge.events import EventClass
from edge.outbox.queries import parked_key_set
from edge.outbox.sqlutil import in_chunks, in_list

__all__ = ["LeasedRow", "scan_lease"]



@dataclass(slots=True)
class LeasedRow:
    seq: int
    event_class: int
    ordering_key: str | None
    attempts: int
    event_id: str = ""
    type: str = ""
    sha256: str = ""
    body: bytes = b""
    received_at: float = 0.0


class _Picker:
    """Accepts rows as the scan meets them; per key it keeps ``tail`` (the last row picked)
    or marks the key ``blocked`` (its next row is in flight or waiting for a retry)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        sink: str,
        limit: int,
        inflight: set[int],
        now: float,
        parked: set[str] | frozenset[str] = frozenset(),
        not_before: dict[int, float] | None = None,
    ) -> None:
        self.conn = conn
        self.sink = sink
        self.limit = limit
        self.inflight = inflight
        self.now = now
        self.not_before = not_before or {}
        self.picked: dict[int, LeasedRow] = {}
        self.tail: dict[str, int] = {}
        self.blocked: set[str] = set(parked)

    def _due(self, seq: int, next_at: float) -> bool:
        return next_at <= self.now and self.not_before.get(seq, 0.0) <= self.now

    @property
    def full(self) -> bool:
        return len(self.picked) >= self.limit

    def consider(self, seq: int, cls: int, key: str | None, next_at: float, attempts: int) -> None:
        if seq in self.picked or seq in self.inflight:
            return
        if key is None:
            if self._due(seq, next_at):
                self.picked[seq] = LeasedRow(seq, cls, None, attempts)
            return
        if key in self.blocked:
            return
        tail = self.tail.get(key)
        if tail is None:
            self._walk_chain(key, seq)
        elif seq > tail:
            self._extend_chain(key, tail, seq, cls, next_at, attempts)

    def _walk_chain(self, key: str, upto: int) -> None:
        """First meeting with ``key``: take its rows from the head up to the row met, so a
        later, higher-class row pulls its lot's earlier rows forward (never overtakes them)
        while the lease keeps close to outbox order (few pages touched per commit)."""
        rows = self.conn.execute(
            "SELECT seq, class, next_at, attempts FROM deliveries "
            "WHERE sink = ? AND ordering_key = ? AND seq <= ? AND done = 0 ORDER BY seq "
            "LIMIT ?", (self.sink, key, upto, self.limit - len(self.picked)),
        ).fetchall()
        for seq, cls, next_at, attempts in rows:
            if seq in self.inflight or not self._due(seq, next_at):
                self.blocked.add(key)  # the key is blocked from here on
                return
            if seq not in self.picked:
                self.picked[seq] = LeasedRow(seq, cls, key, attempts)
            self.tail[key] = seq
        if self.tail.get(key, -1) < upto:
            self.blocked.add(key)  # ran out of room before the row met

    def _extend_chain(self, key: str, tail: int, seq: int, cls: int, next_at: float,
                      attempts: int) -> None:
        """A later row of a key already in this lease: it may follow only if no other row
        of the key lies between (e.g. a lower class the scan has not reached yet)."""
        between = self.conn.execute(
            "SELECT 1 FROM deliveries WHERE sink = ? AND ordering_key = ? AND seq > ? "
            "AND seq < ? AND done = 0 LIMIT 1", (self.sink, key, tail, seq)).fetchone()
        if between is not None or not self._due(seq, next_at):
            self.blocked.add(key)
            return
        self.picked[seq] = LeasedRow(seq, cls, key, attempts)
        self.tail[key] = seq


def _rows(cur: sqlite3.Cursor) -> Iterator[tuple[int, int, str | None, float, int]]:
    while True:
        chunk = cur.fetchmany(256)
        if not chunk:
            return
        yield from chunk


def _newest_first(conn: sqlite3.Connection, sink: str, now: float
                  ) -> Iterator[tuple[int, int, str | None, float, int]]:
    """Rows of ``sink`` by seq, newest first, read lazily.

    One descending range of ``deliveries_ready`` per class, merged by seq: a plain
    ``ORDER BY seq DESC`` over the sink sorts its whole backlog in a temporary b-tree on
    every lease (time and memory grow with the backlog).
    """
    streams = [
        _rows(
            conn.execute(
                "SELECT seq, class, ordering_key, next_at, attempts FROM deliveries "
                "INDEXED BY deliveries_ready WHERE sink = ? AND class = ? AND done = 0 "
                "AND next_at <= ? ORDER BY seq DESC",
                (sink, int(cls), now),
            )
        )
        for cls in EventClass
    ]
    return heapq.merge(*streams, key=lambda row: row[0], reverse=True)


def scan_lease(
    conn: sqlite3.Connection,
    sink: str,
    limit: int,
    *,
    live_limit: int = 0,
    inflight: set[int] | frozenset[int] = frozenset(),
    now: float,
    park: bool = True,
    not_before: dict[int, float] | None = None,
    max_scan: int = 20_000,
) -> list[LeasedRow]:
    """Pick up to ``limit`` deliverable rows of ``sink`` and load their events.

    The scan reads one snapshot of the database (one read transaction): its statements
    must agree with each other and with the in-flight set the caller took before it. In
    autocommit each statement would see the latest commit: a dead letter committed
    between the parked-key query and the chain walk was neither a parked key (too early)
    nor a row of the chain (already moved out of ``deliveries``), so the walk started
    after it and the key's next event was sent past its dead letter.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        return _scan(conn, sink, limit, live_limit=live_limit, inflight=inflight, now=now,
                     park=park, not_before=not_before, max_scan=max_scan)
    finally:
        if own:
            conn.execute("COMMIT")


def _scan(
    conn: sqlite3.Connection,
    sink: str,
    limit: int,
    *,
    live_limit: int,
    inflight: set[int] | frozenset[int],
    now: float,
    park: bool,
    not_before: dict[int, float] | None,
    max_scan: int,
) -> list[LeasedRow]:
    parked: set[str] | frozenset[str] = parked_key_set(conn, sink) if park else frozenset()
    picker = _Picker(conn, sink, limit - live_limit if live_limit > 0 else limit,
                     set(inflight), now, parked, not_before)
    budget = [max_scan]

    def feed(rows: Iterator[tuple[int, int, str | None, float, int]]) -> bool:
        """Consider rows until the lease is full; False when ``rows`` ran out."""
        while not picker.full:
            if budget[0] <= 0:
                return True
            row = next(rows, None)
            if row is None:
                return False
            budget[0] -= 1
            picker.consider(*row)
        return True

    oldest = _rows(
        conn.execute(
            "SELECT seq, class, ordering_key, next_at, attempts FROM deliveries "
            "INDEXED BY deliveries_ready WHERE sink = ? AND done = 0 AND next_at <= ? "
            "ORDER BY class, seq",
            (sink, now),
        )
    )
    more = feed(oldest)
    if more and live_limit > 0:
        # A backlog: give the newest rows a share of this lease, then fill from the oldest.
        picker.limit = limit
        budget[0] = max_scan
        feed(_newest_first(conn, sink, now))
        feed(oldest)
    rows = [picker.picked[s] for s in sorted(picker.picked)]
    _load_events(conn, rows)
    return [r for r in rows if r.body]


def _load_events(conn: sqlite3.Connection, rows: list[LeasedRow]) -> None:
    by_seq = {r.seq: r for r in rows}
    for chunk in in_chunks(list(by_seq)):
        marks, params = in_list(chunk)
        for seq, event_id, type_, sha, body, received_at in conn.execute(
            f"SELECT seq, id, type, sha256, body, received_at FROM events WHERE seq IN ({marks})",
            params,
        ):
            row = by_seq[seq]
            row.event_id, row.type, row.sha256, row.body = event_id, type_, sha, body
            row.received_at = received_at
