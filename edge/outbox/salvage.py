"""Salvage a moved-aside (corrupt) outbox file: re-queue what can still be read.

When the start-up check finds the outbox corrupt it moves the file aside and starts a fresh
one (``edge.outbox.integrity``). Events that were still queued exist only in the moved file;
``edge outbox salvage FILE`` brings them back into the live outbox.

Reading (``read_file``) never touches ``FILE``: it works on a copy (with its ``-wal``) in a
temporary folder.
- A destroyed file header (the first 100 bytes) is rebuilt on the copy from the layout of
  every outbox file (the page size is recognised from page 1's b-tree header).
- Tables are read in rowid (seq) order, in chunks. Where SQLite reports a damaged page, the
  rows before it are kept, the first readable rowid after it is found by bisection (a seek
  only fails inside the damaged page's key range) and the range in between is reported lost.
  The ids of the events on a lost page are taken from the ``events.id`` index (a separate
  b-tree; read without touching the table), and each of them is tried once more on its own
  (a second damaged page may have hidden intact ones in between).
- Delivery rows are read per chunk of seqs; where they cannot be read the event goes to the
  sinks whose routes accept its type in the given config (``router``), so a sink may get it
  a second time: the receiver dedupes it by its id (``Idempotency-Key``).

Re-queueing (``Salvage.run``) writes to the live outbox in short ``BEGIN IMMEDIATE``
transactions, like the other ``edge outbox`` verbs, so it is safe while the gateway runs
(its forwarder picks the rows up on its next pass). Per event:
- same id as before (``Idempotency-Key``), same type, class, ordering key, source, ingest
  time, stored body and digest. Its seq: the original one when the live outbox was started
  above the moved file's last seq (``SEQ_FLOOR_KEY`` in ``meta``, set by the start-up check)
  and the seq is free, so the salvaged events go before every event of the same key stored
  since the restart; otherwise new seqs above every seq given, in the original order.
- already present (skipped): the live outbox has the id, or its audit trail has (salvaged
  and delivered before: running twice stores nothing twice, within the audit retention),
  or the source's dedupe key of the event is in the live outbox under another id (the
  broker redelivered the message after the crash and it was stored again).
- a dead letter of the old file is re-created in the live dead-letter table (new id, same
  sink, status, reason and response body): its key stays parked for that sink until an
  operator replays or discards it, as before the corruption.
- a body that no longer matches its stored SHA-256 is never made sendable: it goes to the
  dead-letter table with an integrity reason (its key parks) and is listed in the summary.
- every re-queued event gets a ``salvaged`` audit row (actor, file, old and new seq); the
  run ends with one ``salvaged`` summary row (event_id NULL) with the counts and lost ranges.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edge.errors import EdgeError
from edge.events import EventClass
from edge.outbox import audit
from edge.outbox.schema import SCHEMA_VERSION
from edge.outbox.sqlutil import in_chunks, in_list, insert_rows
from edge.timefmt import utc_iso

__all__ = ["SEQ_FLOOR_KEY", "SalvageError", "SalvageReport", "Salvage", "peek", "read_file"]

SEQ_FLOOR_KEY = "salvage_seq_floor"  # meta: seqs up to this belong to a moved-aside file
CHUNK = 500
_MAX_ROWID = (1 << 63) - 1
_EVENT_COLS = "id, type, class, ordering_key, source, received_at, sha256, body"
_DL_COLS = ("seq, sink, event_id, type, class, ordering_key, status, reason, response_body, "
            "attempts, dead_at")

Router = Callable[[str], list[str]]


class SalvageError(EdgeError):
    """The file cannot be salvaged at all (no schema readable, wrong version, it is the live
    outbox); the message says why."""


@dataclass(slots=True)
class OldEvent:
    seq: int
    id: str
    type: str
    cls: int
    ordering_key: str | None
    source: str
    received_at: float
    sha256: str
    body: bytes


@dataclass
class SalvageReport:
    file: str
    header_rebuilt: bool = False
    rows_read: int = 0
    requeued: int = 0
    deliveries: int = 0
    kept_seq: int = 0
    new_seq: int = 0
    already_present: int = 0
    redelivered: int = 0
    nothing_to_deliver: int = 0
    dead_letters_found: int = 0
    dead_letters_requeued: int = 0
    digest_mismatch: list[str] = field(default_factory=list)
    routed_by_config: int = 0
    no_route: list[str] = field(default_factory=list)
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)
    unreadable: dict[int, str | None] = field(default_factory=dict)  # seq → event id
    other_tables: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "dry_run": self.dry_run, "header_rebuilt": self.header_rebuilt,
            "rows_read": self.rows_read, "requeued": self.requeued,
            "deliveries": self.deliveries, "kept_seq": self.kept_seq, "new_seq": self.new_seq,
            "already_present": self.already_present, "redelivered": self.redelivered,
            "nothing_to_deliver": self.nothing_to_deliver,
            "dead_letters_found": self.dead_letters_found,
            "dead_letters_requeued": self.dead_letters_requeued,
            "digest_mismatch": self.digest_mismatch, "routed_by_config": self.routed_by_config,
            "no_route": self.no_route,
            "unreadable": {"count": len(self.unreadable),
                           "seq_ranges": [list(r) for r in self.lost_ranges],
                           "event_ids": sorted(i for i in self.unreadable.values() if i),
                           "ids_unknown": sum(1 for i in self.unreadable.values() if not i)},
            "other_tables_lost": {k: [list(r) for r in v] for k, v in self.other_tables.items()},
        }


# --------------------------------------------------------------------------- reading


def _copy(path: Path, folder: Path) -> Path:
    """``path`` and its ``-wal`` copied into ``folder`` (the ``-shm`` is rebuilt)."""
    dst = folder / "salvage.db"
    shutil.copyfile(path, dst)
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        shutil.copyfile(wal, f"{dst}-wal")
    return dst


def _page_size(data: bytes, size: int) -> int | None:
    """The page size of an outbox file whose header is gone: page 1 holds the schema table,
    a b-tree page starting at offset 100 (leaf 0x0D or interior 0x05)."""
    if len(data) <= 100 or data[100] not in (0x0D, 0x05):
        return None
    cells = struct.unpack(">H", data[103:105])[0]
    for ps in (4096, 1024, 2048, 8192, 16384, 32768, 65536):
        if size % ps == 0 and cells and 0 < struct.unpack(">H", data[105:107])[0] <= ps:
            return ps
    return None


def _rebuild_header(db: Path, wal: bool) -> bool:
    """Write a plausible header over a destroyed one (on the copy). False if page 1 is not
    recognisable either."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        data = f.read(4096)
        ps = _page_size(data, size)
        if ps is None:
            return False
        mode = 2 if wal else 1
        header = (b"SQLite format 3\x00"
                  + struct.pack(">HBBBBBB", 1 if ps == 65536 else ps, mode, mode, 0, 64, 32, 32)
                  + struct.pack(">IIIIIIIIIIIII", 1, size // ps, 0, 0, 1, 4, 0, 0, 1,
                                SCHEMA_VERSION, 0, 0, 0)
                  + bytes(16) + struct.pack(">II", 1, sqlite3.sqlite_version_info[0] * 1000000
                                            + sqlite3.sqlite_version_info[1] * 1000
                                            + sqlite3.sqlite_version_info[2]))
        assert len(header) == 100
        f.seek(0)
        f.write(header)
    return True


def _open_copy(db: Path, report: SalvageReport) -> sqlite3.Connection:
    for attempt in range(2):
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("PRAGMA query_only=1")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as err:
            conn.close()
            if attempt == 0 and _rebuild_header(db, Path(f"{db}-wal").exists()):
                report.header_rebuilt = True
                continue
            raise SalvageError(f"{report.file}: cannot read the schema of the file ({err}); "
                               "nothing can be salvaged by this command") from err
        if "events" not in names:
            conn.close()
            raise SalvageError(f"{report.file}: not an outbox file (no events table)")
        # 0: the header was rebuilt from nothing; 3 differs from 4 only in the audit chain
        if version not in (0, 3, SCHEMA_VERSION):
            conn.close()
            raise SalvageError(f"{report.file}: outbox schema version {version}; this gateway "
                               f"salvages version {SCHEMA_VERSION} files")
        return conn
    raise AssertionError("unreachable")


def _fetch(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Any] | None:
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.DatabaseError:
        return None


def _until_error(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Any]:
    """The rows of ``sql`` up to the first one SQLite cannot read."""
    out: list[Any] = []
    try:
        cur = conn.execute(sql, args)
        while (row := cur.fetchone()) is not None:
            out.append(row)
    except sqlite3.DatabaseError:
        pass
    return out


def _seek_ok(conn: sqlite3.Connection, table: str, x: int) -> bool:
    return _fetch(conn, f"SELECT rowid FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1",
                  (x,)) is not None


def _next_readable(conn: sqlite3.Connection, table: str, bad: int) -> int:
    """The smallest rowid above ``bad`` from which a seek works again (bisection: a seek
    fails only for keys routed to a damaged page); ``_MAX_ROWID + 1`` if none."""
    lo, hi = bad, _MAX_ROWID
    if not _seek_ok(conn, table, hi):
        return _MAX_ROWID + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _seek_ok(conn, table, mid):
            hi = mid
        else:
            lo = mid
    return hi


def walk(conn: sqlite3.Connection, table: str, cols: str,
         on_lost: Callable[[int, int], list[Any]]) -> Iterator[list[Any]]:
    """Rows ``(rowid, *cols)`` of ``table`` in rowid order, in chunks, around damaged pages.
    ``on_lost(first, last)`` is called for each rowid range that cannot be read and returns
    rows of that range it could still read another way (yielded in order)."""
    sql = f"SELECT rowid, {cols} FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT {CHUNK}"
    pos = -_MAX_ROWID
    while pos <= _MAX_ROWID:
        rows = _fetch(conn, sql, (pos,))
        if rows is not None:
            if not rows:
                return
            yield rows
            pos = rows[-1][0] + 1
            continue
        good = _until_error(conn, sql, (pos,))
        if good:
            yield good
            pos = good[-1][0] + 1
        if _seek_ok(conn, table, pos):
            # the key is readable but not the row (a damaged overflow page): lose that row
            first = conn.execute(f"SELECT rowid FROM {table} WHERE rowid >= ? ORDER BY rowid "
                                 "LIMIT 1", (pos,)).fetchone()
            if first is None:
                return
            if (row := _fetch(conn, sql.replace(">=", "=", 1), (first[0],))):
                yield row
            else:
                yield on_lost(first[0], first[0])
            pos = first[0] + 1
            continue
        nxt = _next_readable(conn, table, pos)
        again = on_lost(pos, nxt - 1)
        if again:
            yield again
        pos = nxt


def _event(row: Sequence[Any]) -> OldEvent:
    ev = OldEvent(*row)
    if not isinstance(ev.body, bytes):  # a damaged record may change a column's type
        ev.body = str(ev.body).encode()
    return ev


@dataclass
class FileReader:
    """An opened copy of the moved file: events in seq order, their deliveries, the dead
    letters and dedupe keys, with everything unreadable recorded in ``report``."""

    conn: sqlite3.Connection
    report: SalvageReport
    dead_letters: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)
    dedupe: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def load_side_tables(self) -> None:
        for rows in walk(self.conn, "dead_letters", _DL_COLS, self._lost("dead_letters")):
            for r in rows:
                self.dead_letters.setdefault(r[1], []).append(r[1:])
                self.report.dead_letters_found += 1
        for rows in walk(self.conn, "dedupe", "source, key, event_id, created_at, scope",
                         self._lost("dedupe")):
            for r in rows:
                self.dedupe[r[3]] = r[1:]

    def _lost(self, table: str) -> Callable[[int, int], list[Any]]:
        def note(first: int, last: int) -> list[Any]:
            self.report.other_tables.setdefault(table, []).append((max(first, 1), last))
            return []
        return note

    def events(self) -> Iterator[list[OldEvent]]:
        last = 0
        for rows in walk(self.conn, "events", _EVENT_COLS, self._lost_events):
            last = max(last, rows[-1][0])
            yield [_event(r) for r in rows]
        last = max([last, *(b for _, b in self.report.lost_ranges)])
        top = self._highest_known_seq()
        # the walk may end early (a truncated file: the b-tree looks complete but its right
        # edge is gone) while other b-trees know higher seqs
        if top > last and (again := self._lost_events(last + 1, top)):
            yield [_event(r) for r in again]

    def _highest_known_seq(self) -> int:
        """The highest seq the id index, the delivery rows or the dead letters hold; the
        last seq given (meta) only when none of them can be read."""
        found: list[int] = [max(self.dead_letters, default=0)]
        readable = False
        for sql in ("SELECT MAX(rowid) FROM events INDEXED BY sqlite_autoindex_events_1",
                    "SELECT MAX(seq) FROM deliveries"):
            rows = _fetch(self.conn, sql, ())
            if rows is not None:
                readable = True
                found.append(int(rows[0][0] or 0))
        if not readable:
            rows = _fetch(self.conn, "SELECT value FROM meta WHERE key = 'last_seq'", ())
            found.extend(int(r[0]) for r in rows or [])
        return max(found)

    def _lost_events(self, first: int, last: int) -> list[Any]:
        """Which events lived in ``first..last``: the id index, the delivery rows and the
        dead letters know their seqs; each is tried once more on its own."""
        known: dict[int, str | None] = {}
        rows = _fetch(self.conn, "SELECT rowid, id FROM events INDEXED BY "
                      "sqlite_autoindex_events_1 WHERE rowid BETWEEN ? AND ?", (first, last))
        for seq, eid in rows or []:
            known[seq] = eid
        for seq, in _fetch(self.conn, "SELECT DISTINCT seq FROM deliveries WHERE seq BETWEEN "
                                       "? AND ?", (first, last)) or []:
            known.setdefault(seq, None)
        for seq, dls in self.dead_letters.items():
            if first <= seq <= last:
                known[seq] = known.get(seq) or dls[0][2]
        again: list[Any] = []
        for seq in sorted(known):
            row = _fetch(self.conn, f"SELECT rowid, {_EVENT_COLS} FROM events WHERE rowid = ?",
                         (seq,))
            if row:
                again.extend(row)
            else:
                self.report.unreadable[seq] = known[seq]
        lost_first = first if first > -_MAX_ROWID else (min(known) if known else 1)
        lost_last = last if last < _MAX_ROWID else (max(known) if known else lost_first)
        self.report.lost_ranges.append((max(lost_first, 1), lost_last))
        return again

    def _has_done(self) -> bool:
        cols = _fetch(self.conn, "SELECT name FROM pragma_table_info('deliveries')", ())
        return any(c[0] == "done" for c in cols or [])

    def deliveries(self, seqs: Sequence[int]) -> dict[int, list[tuple[Any, ...]] | None]:
        """seq → its delivery rows (sink, attempts, last_error); None where unreadable."""
        out: dict[int, list[tuple[Any, ...]] | None] = {s: [] for s in seqs}
        # a row marked done (schema 5) was delivered: nothing to re-queue for it
        undone = " AND done = 0" if self._has_done() else ""
        rows = _fetch(self.conn, "SELECT seq, sink, attempts, last_error FROM deliveries "
                      f"WHERE seq BETWEEN ? AND ?{undone}", (seqs[0], seqs[-1]))
        if rows is None:
            for s in seqs:
                one = _fetch(self.conn, "SELECT seq, sink, attempts, last_error FROM "
                             f"deliveries WHERE seq = ?{undone}", (s,))
                out[s] = None if one is None else [r[1:] for r in one]
            return out
        for r in rows:
            if r[0] in out:
                lst = out[r[0]]
                assert lst is not None
                lst.append(r[1:])
        return out


def read_file(path: str | os.PathLike[str], folder: Path) -> FileReader:
    """Copy ``path`` into ``folder`` and open the copy (see module doc). Raises
    ``SalvageError`` when not even the schema can be read."""
    report = SalvageReport(file=str(path))
    db = _copy(Path(path), folder)
    conn = _open_copy(db, report)
    reader = FileReader(conn, report)
    reader.load_side_tables()
    return reader


def peek(path: str) -> tuple[int | None, int | None]:
    """(last seq given, queued delivery rows) of a moved-aside file, read in place and
    read-only; None for what cannot be read. Cheap: used at start-up."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return None, None
    last: int | None = None
    queued: int | None = None
    try:
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            top = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
            last = max(int(row[0]) if row else 0, int(top or 0))
        except (sqlite3.Error, ValueError):
            last = None
        try:
            try:
                queued = int(conn.execute("SELECT count(*) FROM deliveries WHERE done = 0"
                                          ).fetchone()[0])
            except sqlite3.OperationalError:  # schema before 5: no done column
                queued = int(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])
        except sqlite3.Error:
            queued = None
    finally:
        conn.close()
    return last, queued


# --------------------------------------------------------------------------- re-queueing


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    return max(int(row[0]) if row else 0, int(top))


def _ids_known(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for chunk in in_chunks(ids):
        marks, params = in_list(chunk)
        found.update(r[0] for r in conn.execute(
            f"SELECT id FROM events WHERE id IN ({marks})", params))
        found.update(r[0] for r in conn.execute(
            f"SELECT DISTINCT event_id FROM audit WHERE event_id IN ({marks})", params))
    return found


class Salvage:
    """Re-queue the readable events of ``reader`` into the live outbox ``live``."""

    def __init__(self, reader: FileReader, live: sqlite3.Connection, *, actor: str,
                 router: Router | None, dry_run: bool = False) -> None:
        self.reader = reader
        self.live = live
        self.actor = actor
        self.router = router
        self.report = reader.report
        self.report.dry_run = dry_run
        self.file = reader.report.file
        row = live.execute("SELECT value FROM meta WHERE key = ?", (SEQ_FLOOR_KEY,)).fetchone()
        self.floor = int(row[0]) if row else 0
        self.renumber = False  # once one event needs a new seq, all later ones do (order)
        self._skipped: tuple[int, str | None, float] | None = None  # last one stored again

    def run(self) -> SalvageReport:
        for chunk in self.reader.events():
            self.report.rows_read += len(chunk)
            # one short write transaction per chunk; a dry run makes the same changes and
            # rolls them back, so its figures are exactly those of a real run
            self.live.execute("BEGIN IMMEDIATE")
            try:
                self._apply(chunk)
            except BaseException:
                self.live.execute("ROLLBACK")
                raise
            self.live.execute("ROLLBACK" if self.report.dry_run else "COMMIT")
        if not self.report.dry_run:
            rep = self.report.to_json()
            detail = {k: rep[k] for k in ("file", "rows_read", "requeued", "already_present",
                                          "dead_letters_found", "dead_letters_requeued",
                                          "unreadable", "digest_mismatch")}
            self.live.execute("BEGIN IMMEDIATE")
            audit.insert_audit(self.live, [audit.audit_row(
                "salvaged", actor=self.actor, reason=f"salvage of {self.file}",
                detail=detail)])
            self.live.execute("COMMIT")
        return self.report

    def _plan(self, chunk: list[OldEvent], conn: sqlite3.Connection
              ) -> list[tuple[OldEvent, list[tuple[Any, ...]] | None]]:
        """The events of ``chunk`` to store, with their old delivery rows (None: unknown);
        counts the others in the report."""
        rep = self.report
        known = _ids_known(conn, [e.id for e in chunk])
        redelivered = self._stored_again(conn, chunk)
        dels = self.reader.deliveries([e.seq for e in chunk])
        todo = []
        for ev in chunk:
            if self._derived_from_skipped(ev):
                redelivered.add(ev.id)
            if ev.id in known or ev.id in redelivered:
                rep.already_present += 1
                rep.redelivered += int(ev.id in redelivered and ev.id not in known)
                if ev.id in redelivered:
                    self._skipped = (ev.seq, ev.ordering_key, ev.received_at)
                continue
            rows = dels[ev.seq]
            if rows == [] and ev.seq not in self.reader.dead_letters:
                rep.nothing_to_deliver += 1
                continue
            todo.append((ev, rows))
        return todo

    def _derived_from_skipped(self, ev: OldEvent) -> bool:
        """A rule's derived events are stored right after their cause (next seqs, same key,
        same transaction): when the cause was stored again from a redelivery, so were they
        (the daemon drops them with a matched cause)."""
        if self._skipped is None:
            return False
        seq, key, at = self._skipped
        return ev.seq == seq + 1 and ev.ordering_key == key and ev.received_at == at

    def _stored_again(self, conn: sqlite3.Connection, chunk: list[OldEvent]) -> set[str]:
        """Ids of ``chunk`` the live outbox stored again under another id: its source's
        dedupe key is there, and it is a content hash (matched only for a redelivery of the
        same bytes) or an identity key of an event with the same data (a per-lot key like
        a hold's names the lot, not the message: another part's hold is not this one)."""
        out: set[str] = set()
        for ev in chunk:
            d = self.reader.dedupe.get(ev.id)
            if d is None:
                continue
            row = conn.execute("SELECT event_id FROM dedupe WHERE source = ? AND key = ?",
                               (d[0], d[1])).fetchone()
            if row is None or row[0] == ev.id:
                continue
            if int(d[4]) == 0 or _data_sha(ev.body) == _live_data_sha(conn, row[0]):
                out.add(ev.id)
        return out

    def _seq_for(self, ev: OldEvent) -> int:
        if not self.renumber and ev.seq <= self.floor and self.live.execute(
                "SELECT 1 FROM events WHERE seq = ?", (ev.seq,)).fetchone() is None:
            self.report.kept_seq += 1
            return ev.seq
        self.renumber = True
        seq = _last_seq(self.live) + 1
        self.live.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?)",
                          (str(seq),))
        self.report.new_seq += 1
        return seq

    def _apply(self, chunk: list[OldEvent]) -> None:
        rep = self.report
        ts = utc_iso()
        now = time.time()
        for ev, rows in self._plan(chunk, self.live):
            sinks: list[tuple[str, int, str | None]]
            if rows is None:
                routed = self.router(ev.type) if self.router else []
                if not routed and ev.seq not in self.reader.dead_letters:
                    rep.no_route.append(ev.id)
                    continue
                sinks = [(s, 0, None) for s in routed]
                rep.routed_by_config += 1
            else:
                sinks = [(r[0], int(r[1] or 0), r[2]) for r in rows]
            seq = self._seq_for(ev)
            insert_rows(self.live, "events(seq, id, type, class, ordering_key, source, "
                        "received_at, sha256, body)",
                        [(seq, ev.id, ev.type, ev.cls, ev.ordering_key, ev.source,
                          ev.received_at, ev.sha256, ev.body)])
            intact = hashlib.sha256(ev.body).hexdigest() == ev.sha256
            old_dls = self.reader.dead_letters.get(ev.seq, [])
            dl_sinks = {d[1] for d in old_dls}
            au = [audit.audit_row(
                "salvaged", event_id=ev.id, actor=self.actor, ordering_key=ev.ordering_key,
                reason=f"salvaged from {self.file}", ts=ts,
                detail={"file": self.file, "old_seq": ev.seq, "seq": seq,
                        "class": _class_name(ev.cls),
                        "sinks": [s for s, _, _ in sinks], "dead_letters": sorted(dl_sinks),
                        "intact": intact})]
            for d in old_dls:
                _, sink, eid, type_, cls, key, status, reason, body, attempts, dead_at = d
                self.live.execute(
                    "INSERT INTO dead_letters(seq, sink, event_id, type, class, ordering_key, "
                    "status, reason, response_body, attempts, dead_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (seq, sink, eid, type_, cls, key, status, reason, body, attempts, dead_at))
                rep.dead_letters_requeued += 1
            for sink, attempts, last_error in sinks:
                if sink in dl_sinks:
                    continue
                if not intact:
                    reason = ("integrity: stored event differs from its SHA-256 taken at "
                              f"ingest (found by salvage of {self.file})")
                    self.live.execute(
                        "INSERT INTO dead_letters(seq, sink, event_id, type, class, "
                        "ordering_key, status, reason, response_body, attempts, dead_at) "
                        "VALUES (?,?,?,?,?,?,NULL,?,NULL,?,?)",
                        (seq, sink, ev.id, ev.type, ev.cls, ev.ordering_key, reason,
                         attempts, now))
                    au.append(audit.audit_row("dead_lettered", event_id=ev.id, sink=sink,
                                              actor=self.actor, reason=reason, ts=ts,
                                              ordering_key=ev.ordering_key))
                    continue
                self.live.execute(
                    "INSERT INTO deliveries(seq, sink, class, ordering_key, attempts, "
                    "last_error) VALUES (?,?,?,?,?,?)",
                    (seq, sink, ev.cls, ev.ordering_key, attempts, last_error))
                rep.deliveries += 1
            if not intact:
                rep.digest_mismatch.append(ev.id)
            key = self.reader.dedupe.get(ev.id)
            if key is not None:  # a later redelivery of the same message still matches
                self.live.execute("INSERT OR IGNORE INTO dedupe(source, key, event_id, "
                                  "created_at, scope) VALUES (?,?,?,?,?)", key)
            audit.insert_audit(self.live, au)
            rep.requeued += 1


def _data_sha(body: bytes) -> str | None:
    """The SHA-256 of an event's data taken at ingest (in its stored envelope)."""
    try:
        sha = orjson.loads(body).get("payload_sha256")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return str(sha) if sha else None


def _live_data_sha(conn: sqlite3.Connection, event_id: str) -> str | None:
    """The data SHA-256 of a live event: from its body, or from its ``stored`` audit row
    once it was delivered."""
    row = conn.execute("SELECT body FROM events WHERE id = ?", (event_id,)).fetchone()
    if row is not None:
        return _data_sha(row[0])
    row = conn.execute("SELECT detail FROM audit WHERE event_id = ? AND state = 'stored'",
                       (event_id,)).fetchone()
    if row is None or not row[0]:
        return None
    sha = orjson.loads(row[0]).get("sha256")
    return str(sha) if sha else None


def _class_name(cls: int) -> str:
    try:
        return EventClass(cls).name
    except ValueError:
        return str(cls)


def open_reader(path: str) -> tuple[FileReader, tempfile.TemporaryDirectory[str]]:
    """``read_file`` into a private temporary folder; the caller cleans the folder up."""
    tmp = tempfile.TemporaryDirectory(prefix="edge-salvage-")
    try:
        return read_file(path, Path(tmp.name)), tmp
    except BaseException:
        tmp.cleanup()
        raise
