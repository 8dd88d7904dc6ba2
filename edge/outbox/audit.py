"""The audit trail: an append-only, hash-chained record of every state change of every event.

Rows live in the outbox database and are written in the SAME transaction as the change they
describe, so the trail can never disagree with the outbox. ``seq`` is the monotonic
sequence (gapless as written: each row takes the newest seq + 1); ``ts`` is UTC ISO-8601
with microseconds.

Chain (DESIGN invariant 8, docs/audit.md): each row's ``hash`` is
SHA-256(previous row's hash as hex ‖ canonical JSON of [seq, ts, event_id, sink, state,
actor, reason, ordering_key, detail]). The previous hash is read from the table in the
writing transaction (no cache), so a rolled-back transaction leaves nothing behind and the
next one chains from what was committed. Editing a row breaks its own hash; deleting or
reordering rows breaks the link at the first affected seq.

Checkpoints (``audit_checkpoints``, chained among themselves the same way): ``genesis``
starts the chain (of a new file, or of a file written before the chain, whose rows were
chained at the upgrade); ``pruned`` is written in the transaction of every prune with the
count, the seq range and, per run of pruned seqs, the hash of its last row — so the rows
kept still verify; ``rebased`` replaces older checkpoints (``compact_checkpoints``) so
their number stays bounded, and is then where the walk starts. A checkpoint is
HMAC-signed when ``audit.checkpoint_key_file`` is set.

States of an event (``state`` column):
  stored        received from a source and committed (detail: type, class, source, sha256,
                sinks); the ingest record, payload SHA-256 included
  unrouted      received but no sink has a route for its type (not stored; counted)
  duplicate_dropped  a copy matched an already-stored dedupe key and was not stored
                (detail: source, key scope, the stored event's id)
  delivered     the sink confirmed (detail: status, attempts); ``duplicate`` when the
                receiver said it already had it (409 ...)
  retry         an attempt failed and will be retried (reason, status, next attempt)
  dead_lettered moved to the dead-letter table (status, reason)
  expired       removed by the `low` class disk policy
  replayed      an operator moved a dead letter back to the queue (actor, reason)
  discarded     an operator removed a dead letter or an orphaned row (actor, reason)
  rerouted      an operator moved rows of a removed sink to another sink (actor, reason)
  salvaged      re-queued from a moved-aside outbox file (actor, file, old and new seq)
Component events (``event_id`` NULL): ``quarantined`` (an inbound record kept in the
quarantine table: source, reason, quarantine id, raw SHA-256), source gaps, reconnects,
subscription and backfill notices, file taken / done / rejected, sink pauses, outbox
quarantine, ``audit_pruned_unexported`` (disk pressure pruned rows not yet exported).

Retention: rows older than ``audit.retention_days`` are pruned (the one deliberate
exception to append-only, so the disk stays bounded), each prune leaving a checkpoint; with
``audit.export`` only rows already exported are pruned by retention.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from edge.outbox.sqlutil import insert_rows
from edge.timefmt import utc_iso

__all__ = [
    "CHECKPOINT_COLUMNS", "ENTRY_COLUMNS", "GENESIS_HASH", "AuditRow", "Checkpoint",
    "VerifyResult", "audit_row", "chain_hash", "compact_checkpoints", "ensure_chain",
    "insert_audit",
    "prune_entries", "trace_event", "trace_key", "verify", "verify_db",
]

AuditRow = tuple[str, str | None, str | None, str, str, str | None, str | None, str | None]

GENESIS_HASH = "0" * 64
"""The "previous hash" of the genesis checkpoint and of the first row of a new chain."""

ENTRY_COLUMNS = ("seq", "ts", "event_id", "sink", "state", "actor", "reason", "ordering_key",
                 "detail", "hash")
CHECKPOINT_COLUMNS = ("id", "ts", "kind", "reason", "count", "first_seq", "last_seq",
                      "last_hash", "ranges", "detail", "hash", "signature")


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


def chain_hash(prev: str, fields: Sequence[Any]) -> str:
    """SHA-256 hex of ``prev`` (hex) followed by the canonical JSON array of ``fields``."""
    return hashlib.sha256(prev.encode() + orjson.dumps(fields)).hexdigest()  # tuple: array


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(seq to continue from, hash to chain from): the newest entry, which a prune never
    removes; in a file without entries, the genesis checkpoint."""
    try:
        best = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError as err:
        if "hash" not in str(err):
            raise
        raise sqlite3.OperationalError(
            "the outbox file predates the audit chain (schema 3); start the gateway once with "
            "it (the upgrade chains its audit trail) before changing it from the command line"
        ) from err
    if best is None:
        best = conn.execute("SELECT last_seq, last_hash FROM audit_checkpoints "
                            "ORDER BY last_seq DESC LIMIT 1").fetchone() or (0, GENESIS_HASH)
    top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    # entries deleted at the end outside a prune: continue above them, so the gap shows
    return max(int(best[0]), int(top[0]) if top else 0), best[1] or GENESIS_HASH


def insert_audit(conn: sqlite3.Connection, rows: list[AuditRow]) -> None:
    """Append ``rows`` to the chain (caller holds the write transaction)."""
    if not rows:
        return
    seq, prev = _head(conn)
    out = []
    for row in rows:
        seq += 1
        full = (seq, *row)
        prev = chain_hash(prev, full)
        out.append((*full, prev))
    insert_rows(conn, "audit(seq, ts, event_id, sink, state, actor, reason, ordering_key, "
                "detail, hash)", out)


# --------------------------------------------------------------------------- checkpoints


def _sign(key: bytes | None, digest: str) -> str | None:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest() if key else None


def _checkpoint_fields(cp_id: int, ts: str, kind: str, reason: str | None, count: int,
                       first_seq: int | None, last_seq: int, last_hash: str,
                       ranges: str | None, detail: str | None) -> list[Any]:
    return [cp_id, ts, kind, reason, count, first_seq, last_seq, last_hash, ranges, detail]


def write_checkpoint(conn: sqlite3.Connection, *, kind: str, reason: str | None, count: int,
                     first_seq: int | None, last_seq: int, last_hash: str,
                     ranges: list[list[Any]] | None, detail: dict[str, Any] | None,
                     key: bytes | None = None) -> int:
    """Append a checkpoint to the checkpoint chain; returns its id."""
    prev_row = conn.execute("SELECT id, hash FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
                            ).fetchone()
    top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_checkpoints'"
                       ).fetchone()
    cp_id = max(prev_row[0] if prev_row else 0, top[0] if top else 0) + 1
    prev = prev_row[1] if prev_row else GENESIS_HASH
    ts = utc_iso()
    ranges_text = orjson.dumps(ranges).decode() if ranges else None
    detail_text = orjson.dumps(detail).decode() if detail else None
    fields = _checkpoint_fields(cp_id, ts, kind, reason, count, first_seq, last_seq, last_hash,
                                ranges_text, detail_text)
    digest = chain_hash(prev, fields)
    conn.execute("INSERT INTO audit_checkpoints(id, ts, kind, reason, count, first_seq, "
                 "last_seq, last_hash, ranges, detail, hash, signature) "
                 "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", (*fields, digest, _sign(key, digest)))
    return cp_id


_UPGRADE_KEY = "audit_chain_upgrade"  # meta: progress of chaining an older file's entries
UPGRADE_CHUNK = 5000  # entries chained per transaction at the upgrade


def ensure_chain(conn: sqlite3.Connection, chunk: int | None = None) -> None:
    """Start the chain of a file that has none (run at open, after the schema, before any
    other writer; outside a transaction).

    A new file gets a genesis checkpoint at seq 0. A file written before the chain keeps its
    entries: they are chained now, ``chunk`` (``UPGRADE_CHUNK``) per transaction (progress in ``meta``, so a
    crash resumes where it stopped and the WAL stays small), then a genesis checkpoint says
    which seqs were chained at the upgrade; seqs already missing then (pruned by the older
    gateway) are listed in it as pruned before the chain, so the rest verifies.
    """
    if conn.execute("SELECT 1 FROM audit_checkpoints LIMIT 1").fetchone():
        return
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_UPGRADE_KEY,)).fetchone()
    progress: dict[str, Any] | None = orjson.loads(row[0]) if row else None
    if progress is None:
        lo, hi, count = conn.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM audit"
                                     ).fetchone()
        if not count:
            top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'"
                               ).fetchone()
            conn.execute("BEGIN IMMEDIATE")
            try:
                write_checkpoint(conn, kind="genesis", reason="chain started", count=0,
                                 first_seq=None, last_seq=int(top[0]) if top else 0,
                                 last_hash=GENESIS_HASH, ranges=None, detail=None)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return
        progress = {"first_seq": lo, "last_seq": hi, "count": count, "after": lo - 1,
                    "prev": GENESIS_HASH, "holes": []}
    _chain_legacy(conn, progress, chunk or UPGRADE_CHUNK)


def _chain_legacy(conn: sqlite3.Connection, progress: dict[str, Any], chunk: int) -> None:
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                "SELECT seq, ts, event_id, sink, state, actor, reason, ordering_key, detail "
                "FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (progress["after"], chunk)
            ).fetchall()
            if not rows:
                holes = progress["holes"]
                lo = progress["first_seq"]
                write_checkpoint(
                    conn, kind="genesis", reason="chained at upgrade", count=0,
                    first_seq=None, last_seq=lo - 1, last_hash=GENESIS_HASH,
                    ranges=holes or None,
                    detail={"chained_at_upgrade": {
                        "first_seq": lo, "last_seq": progress["last_seq"],
                        "count": progress["count"],
                        "missing_then": sum(h[1] - h[0] + 1 for h in holes)}})
                conn.execute("DELETE FROM meta WHERE key = ?", (_UPGRADE_KEY,))
                conn.execute("COMMIT")
                return
            prev, expected = progress["prev"], progress["after"] + 1
            updates = []
            for row in rows:
                if row[0] != expected:
                    progress["holes"].append([expected, row[0] - 1, prev])
                prev = chain_hash(prev, row)
                updates.append((prev, row[0]))
                expected = row[0] + 1
            conn.executemany("UPDATE audit SET hash = ? WHERE seq = ?", updates)
            progress["prev"], progress["after"] = prev, rows[-1][0]
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                         (_UPGRADE_KEY, orjson.dumps(progress).decode()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _runs(rows: Sequence[tuple[int, str]]) -> list[list[Any]]:
    """[[first seq, last seq, hash of the last], ...] of consecutive seqs in ``rows``."""
    out: list[list[Any]] = []
    for seq, digest in rows:
        if out and out[-1][1] == seq - 1:
            out[-1][1], out[-1][2] = seq, digest
        else:
            out.append([seq, seq, digest])
    return out


def prune_entries(conn: sqlite3.Connection, rows: Sequence[tuple[int, str]], *, reason: str,
                  detail: dict[str, Any] | None = None, key: bytes | None = None) -> int:
    """Delete the entries ``rows`` ((seq, hash), ascending) and record a ``pruned``
    checkpoint of them in the same transaction; returns the number deleted.

    The newest entry is never deleted: the next entry chains from it (and a deletion at
    the end stays visible)."""
    newest = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
    rows = [r for r in rows if r[0] != newest]
    if not rows:
        return 0
    runs = _runs(rows)
    conn.executemany("DELETE FROM audit WHERE seq BETWEEN ? AND ?", [r[:2] for r in runs])
    write_checkpoint(conn, kind="pruned", reason=reason, count=len(rows), first_seq=rows[0][0],
                     last_seq=rows[-1][0], last_hash=rows[-1][1], ranges=runs, detail=detail,
                     key=key)
    return len(rows)


def compact_checkpoints(conn: sqlite3.Connection, *, key: bytes | None = None) -> int:
    """Replace every checkpoint by one ``rebased`` checkpoint, so their number stays
    bounded under steady pruning; returns
    how many were replaced (0: nothing to do, or the checkpoint chain does not verify —
    then nothing is changed, the next ``edge audit verify`` names the break).

    The rebased checkpoint says where the entries' chain now starts (the seq before the
    oldest entry kept and the hash it chains from), carries the runs still needed (gaps
    among the entries kept) and names the checkpoints it replaced and the last one's hash;
    it is chained to that hash, so an exported bundle (which has them all) still verifies
    through it."""
    cols = ", ".join(CHECKPOINT_COLUMNS)
    cps = [Checkpoint.from_row(r) for r in conn.execute(
        f"SELECT {cols} FROM audit_checkpoints ORDER BY id")]
    if len(cps) < 2:
        return 0
    probe = VerifyResult()
    if not _verify_checkpoints(cps, 0, key, probe, require_signatures=False):
        return 0
    oldest = conn.execute("SELECT MIN(seq) FROM audit").fetchone()[0]
    if oldest is None:
        return 0
    start = cps[0].last_seq, cps[0].last_hash
    runs: dict[int, tuple[int, str]] = {}
    for cp in cps:
        for lo, hi, digest in orjson.loads(cp.ranges) if cp.ranges else ():
            runs[int(lo)] = (int(hi), str(digest))
    ends = dict(runs.values())
    if oldest - 1 == start[0]:
        prev = start[1]
    elif oldest - 1 in ends:
        prev = ends[oldest - 1]
    else:
        return 0  # the entry before the oldest kept is not accounted for: leave it visible
    kept = sorted([lo, hi, digest] for lo, (hi, digest) in runs.items() if hi >= oldest)
    total = sum(c.count for c in cps)
    last = cps[-1]
    write_checkpoint(conn, kind="rebased", reason="checkpoints compacted", count=total,
                     first_seq=None, last_seq=oldest - 1, last_hash=prev, ranges=kept or None,
                     detail={"replaced": {"first_id": cps[0].id, "last_id": last.id,
                                          "last_hash": last.hash}}, key=key)
    conn.execute("DELETE FROM audit_checkpoints WHERE id <= ?", (last.id,))
    return len(cps)


# --------------------------------------------------------------------------- verify


@dataclass
class Checkpoint:
    id: int
    ts: str
    kind: str
    reason: str | None
    count: int
    first_seq: int | None
    last_seq: int
    last_hash: str
    ranges: str | None
    detail: str | None
    hash: str
    signature: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Checkpoint:
        return cls(*row)

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in CHECKPOINT_COLUMNS}


@dataclass
class VerifyResult:
    """``ok``; ``verified`` entries checked; ``start`` what the walk began from; on a break
    ``seq`` (or ``checkpoint``) of the first broken link and ``kind``: edited, deleted,
    reordered, checkpoint_edited, checkpoint_deleted, bad_signature, unsigned."""

    ok: bool = True
    verified: int = 0
    pruned: int = 0
    checkpoints: int = 0
    start: str = "genesis"
    kind: str | None = None
    seq: int | None = None
    checkpoint: int | None = None
    message: str = ""
    signed: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            extra = f"; {self.pruned} pruned entries covered by checkpoints" if self.pruned else ""
            signed = f", {self.signed} signatures checked" if self.signed else ""
            return (f"{self.verified} entries verified from {self.start} "
                    f"({self.checkpoints} checkpoints{signed}{extra})")
        return self.message


def _broken(res: VerifyResult, kind: str, message: str, *, seq: int | None = None,
            checkpoint: int | None = None) -> VerifyResult:
    res.ok, res.kind, res.seq, res.checkpoint, res.message = False, kind, seq, checkpoint, message
    return res


class _CheckpointWalk:
    """Checks checkpoints one after another (ids contiguous, each chained to the one
    before, signatures with ``key``) and collects the pruned runs they cover."""

    def __init__(self, res: VerifyResult, key: bytes | None, require_signatures: bool = True
                 ) -> None:
        self.res, self.key, self.require_signatures = res, key, require_signatures
        self.first: Checkpoint | None = None
        self.prev = GENESIS_HASH
        self.expected = 1
        self.count = 0
        self.covered: list[tuple[int, int, str]] = []
        self.starts: list[int] = []

    def add(self, cps: Sequence[Checkpoint]) -> bool:
        res = self.res
        for cp in cps:
            if self.first is None or (cp.kind == "rebased" and cp.id > self.expected
                                      and self._replaces_from(cp) <= self.expected):
                # a start: genesis, or a rebased checkpoint whose replaced ones are gone
                if cp.kind not in ("genesis", "rebased"):
                    _broken(res, "checkpoint_deleted", "the genesis checkpoint is missing",
                            checkpoint=1)
                    return False
                self.expected = cp.id if cp.kind == "rebased" else 1
                self.prev = (orjson.loads(cp.detail or "{}")["replaced"]["last_hash"]
                             if cp.kind == "rebased" else GENESIS_HASH)
                self.first = cp
                self.covered, res.pruned = [], 0
            if cp.id != self.expected:
                _broken(res, "checkpoint_deleted", f"checkpoint {self.expected} is missing "
                        f"(deleted); the next one is {cp.id}", checkpoint=self.expected)
                return False
            fields = _checkpoint_fields(cp.id, cp.ts, cp.kind, cp.reason, cp.count,
                                        cp.first_seq, cp.last_seq, cp.last_hash, cp.ranges,
                                        cp.detail)
            if chain_hash(self.prev, fields) != cp.hash:
                _broken(res, "checkpoint_edited", f"checkpoint {cp.id} does not match its "
                        "hash (edited, or an earlier checkpoint was replaced)",
                        checkpoint=cp.id)
                return False
            if self.key is not None and cp.kind != "genesis" and self.require_signatures:
                if not cp.signature:
                    _broken(res, "unsigned", f"checkpoint {cp.id} is not signed (the key was "
                            "given)", checkpoint=cp.id)
                    return False
                if not hmac.compare_digest(cp.signature, _sign(self.key, cp.hash) or ""):
                    _broken(res, "bad_signature", f"checkpoint {cp.id}: signature does not "
                            "match the key", checkpoint=cp.id)
                    return False
                res.signed += 1
            if cp.ranges:
                self.covered.extend((int(a), int(b), str(h))
                                    for a, b, h in orjson.loads(cp.ranges))
            if cp.kind == "pruned" or cp is self.first and cp.kind == "rebased":
                res.pruned += cp.count
            self.prev = cp.hash
            self.expected += 1
            self.count += 1
        self.covered.sort()
        self.starts = [c[0] for c in self.covered]
        res.checkpoints = self.count
        return True

    @staticmethod
    def _replaces_from(cp: Checkpoint) -> int:
        replaced = orjson.loads(cp.detail or "{}").get("replaced") or {}
        return int(replaced.get("first_id", cp.id))

    def check_top(self, top_id: int) -> bool:
        if top_id >= self.expected:
            _broken(self.res, "checkpoint_deleted", f"checkpoint {self.expected} is missing "
                    f"(deleted; checkpoints were written up to {top_id})",
                    checkpoint=self.expected)
            return False
        return True


def _verify_checkpoints(cps: list[Checkpoint], top_id: int, key: bytes | None,
                        res: VerifyResult, *, require_signatures: bool = True) -> bool:
    if not cps:
        _broken(res, "checkpoint_deleted", "the genesis checkpoint is missing", checkpoint=1)
        return False
    walk = _CheckpointWalk(res, key, require_signatures)
    return walk.add(cps) and walk.check_top(top_id)


Entry = tuple[Any, ...]  # ENTRY_COLUMNS


def _diagnose(seq: int, prev: str, present: Entry | None,
              all_entries: Iterable[Entry]) -> tuple[str, str]:
    """Why the link at ``seq`` broke: an entry elsewhere that belongs at ``seq`` means
    reordered; otherwise a present row was edited, a missing one deleted."""
    for other in all_entries:
        if other[0] == seq:
            continue
        digest = chain_hash(prev, (seq, *other[1:9]))
        if digest == other[9] or (present is not None and digest == present[9]):
            return "reordered", (f"entry at seq {seq}: reordered (the entry that belongs at "
                                 f"seq {seq} is at seq {other[0]})")
    if present is None:
        return "deleted", f"entry at seq {seq}: missing (deleted)"
    return "edited", f"entry at seq {seq}: does not match its hash (edited)"


def verify(entries: Iterable[Entry], checkpoints: Sequence[Sequence[Any]], *,
           head: Callable[[], tuple[int, int]], top_checkpoint: int = 0,
           key: bytes | None = None, rescan: Callable[[], Iterable[Entry]] | None = None,
           more_checkpoints: Callable[[int], Sequence[Sequence[Any]]] | None = None
           ) -> VerifyResult:
    """Walk ``entries`` (ascending seq, duplicates allowed if identical) against the
    checkpoints (``top_checkpoint``: the highest checkpoint id ever written when they were
    read). ``head()``, called once the entries are exhausted: (the highest seq ever
    written, the highest checkpoint id ever written) — entries missing above the last one
    kept are deletions unless a checkpoint covers them. ``more_checkpoints(after_id)``:
    checkpoints written since (the walk over a live file reads in several snapshots; a
    prune meanwhile adds one). ``rescan()`` yields the entries again (for the diagnosis of
    a break)."""
    res = VerifyResult()
    cps = [Checkpoint.from_row(c) for c in checkpoints]
    if not cps:
        return _broken(res, "checkpoint_deleted", "the genesis checkpoint is missing",
                       checkpoint=1)
    walk = _CheckpointWalk(res, key)
    if not walk.add(cps) or not walk.check_top(top_checkpoint):
        return res
    genesis = walk.first
    assert genesis is not None
    first = "genesis" if genesis.kind == "genesis" else f"checkpoint {genesis.id} (rebased)"
    res.start = (first if len(cps) == 1 else
                 f"{first} through {len(cps) - 1} later checkpoint(s)")
    if genesis.reason == "chained at upgrade":
        res.notes.append("entries written before the chain were chained when the gateway "
                         f"was upgraded ({genesis.ts})")
    prev = genesis.last_hash
    expected = genesis.last_seq + 1
    last: Entry | None = None

    def cross(target: int) -> bool:
        nonlocal prev, expected
        while expected < target:
            i = bisect.bisect_right(walk.starts, expected) - 1
            if i < 0 or walk.covered[i][1] < expected or walk.covered[i][1] >= target:
                return False
            prev, expected = walk.covered[i][2], walk.covered[i][1] + 1
        return True

    def skip_to(target: int) -> bool:
        """Cross pruned runs from ``expected`` up to ``target``; False on an uncovered gap
        (after looking for checkpoints written meanwhile)."""
        if cross(target):
            return True
        if more_checkpoints is None:
            return False
        fresh = [Checkpoint.from_row(c) for c in more_checkpoints(walk.expected - 1)]
        return bool(fresh) and walk.add(fresh) and cross(target)

    def fail(seq: int, present: Entry | None) -> VerifyResult:
        if not res.ok:  # a checkpoint read meanwhile broke the walk
            return res
        kind, message = _diagnose(seq, prev, present, rescan() if rescan else ())
        return _broken(res, kind, message, seq=seq)

    for entry in entries:
        seq = int(entry[0])
        if last is not None and seq == last[0]:
            if tuple(entry) != tuple(last):
                return _broken(res, "edited", f"entry at seq {seq}: two different copies",
                               seq=seq)
            continue
        if seq < expected:
            return _broken(res, "reordered", f"entry at seq {seq}: out of order (after seq "
                           f"{expected - 1})", seq=seq)
        if not skip_to(seq):
            return fail(expected, None)
        if chain_hash(prev, entry[:9]) != entry[9]:
            return fail(seq, tuple(entry))
        prev, expected, last = entry[9], seq + 1, tuple(entry)
        res.verified += 1
    head_seq, top_checkpoint = head()
    if not skip_to(head_seq + 1):
        return fail(expected, None)
    if more_checkpoints is not None:
        fresh = [Checkpoint.from_row(c) for c in more_checkpoints(walk.expected - 1)]
        if fresh and not walk.add(fresh):
            return res
    if not walk.check_top(top_checkpoint):
        return res
    return res


VERIFY_CHUNK = 50_000
"""Entries read per read transaction: a long walk does not hold one WAL snapshot (which
would keep the gateway's checkpoints from folding the WAL back) for its whole length."""


def verify_db(conn: sqlite3.Connection, key: bytes | None = None, *,
              chunk: int = VERIFY_CHUNK) -> VerifyResult:
    """Verify the chain of an outbox file, running or not: entries in chunks of ``chunk``,
    each chunk one short read transaction; checkpoints a prune writes meanwhile are read
    when the walk meets the gap it left."""
    cols = ", ".join(ENTRY_COLUMNS)
    cp_cols = ", ".join(CHECKPOINT_COLUMNS)
    final: dict[str, int] = {}

    def snapshot(fn: Callable[[], Any]) -> Any:
        conn.execute("BEGIN")
        try:
            return fn()
        finally:
            conn.execute("COMMIT")

    def read(after: int) -> list[Entry]:
        rows = conn.execute(f"SELECT {cols} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                            (after, chunk)).fetchall()
        if not rows:  # the end: the head of this same snapshot
            tops = dict(conn.execute("SELECT name, seq FROM sqlite_sequence "
                                     "WHERE name IN ('audit', 'audit_checkpoints')").fetchall())
            cp_top = conn.execute("SELECT MAX(last_seq), MAX(id) FROM audit_checkpoints"
                                  ).fetchone()
            final["seq"] = max(int(tops.get("audit", 0)), after, int(cp_top[0] or 0))
            final["checkpoint"] = max(int(tops.get("audit_checkpoints", 0)),
                                      int(cp_top[1] or 0))
        return rows

    def entries() -> Iterator[Entry]:
        after = -1
        while rows := snapshot(partial(read, after)):
            yield from rows
            after = rows[-1][0]

    def more(after_id: int) -> list[Any]:
        return snapshot(lambda: conn.execute(
            f"SELECT {cp_cols} FROM audit_checkpoints WHERE id > ? ORDER BY id", (after_id,)
        ).fetchall())

    cps, top = snapshot(lambda: (
        conn.execute(f"SELECT {cp_cols} FROM audit_checkpoints ORDER BY id").fetchall(),
        conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_checkpoints'"
                     ).fetchone()))
    return verify(entries(), cps, head=lambda: (final["seq"], final["checkpoint"]),
                  top_checkpoint=int(top[0]) if top else 0, key=key,
                  rescan=lambda: snapshot(lambda: conn.execute(
                      f"SELECT {cols} FROM audit ORDER BY seq").fetchall()),
                  more_checkpoints=more)


# --------------------------------------------------------------------------- reading

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
    """Audit rows of every event stored under ``ordering_key`` (newest events last).

    Reads the trail from its newest entry back (no index by key: an index ordered by lot
    cost every ingest a page write per lot; an operator's lookup may take a second)."""
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
