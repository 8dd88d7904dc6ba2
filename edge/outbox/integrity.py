"""Integrity of the outbox file (invariant 7: no crash loops), in two steps.

At start, ``open_checked(path)`` runs the cheap check that gates readiness
(``cheap_check``): the file's header (magic string, page size, length consistent with
both), SQLite's open with its WAL recovery, ``PRAGMA schema_version``/``user_version``
and one row of every table (its root page and the path to its first leaf). It reads a
few pages, not the file (SQLite's recovery reads the WAL a crash left, up to its 64 MiB
limit), so its cost does not grow with the backlog. It also honours a verdict of the previous run: ``<path>.corrupt-detected``
(``MARKER_SUFFIX``), written by ``mark_corrupt`` when the background check found the
file damaged at run time, moves the file aside at the next start.

Then ``BackgroundCheck`` runs the full ``PRAGMA quick_check`` on its own read-only
connection and thread (niced, small page cache) while the gateway is ready and stores
events. It reads one snapshot: checkpoints cannot fold the WAL past that snapshot until
it ends, so the WAL grows by what is committed during the check: the check's duration ×
the intake rate × ~12 KB per event at 10 events per commit (``bench/bench_restart.py``
measures it). A guard bounds that growth: past it the check gives way (``deferred``, no
verdict) and runs again later. A corrupt verdict is
written to the marker first, then reported to the caller (``on_corrupt``): the gateway
stops acknowledging intake and raises the ``outbox_corrupt`` alarm; the operator
restarts, the start moves the file aside and ``edge outbox salvage`` re-queues its events.

Only a verdict about the file itself — the check's own findings, or SQLite saying the
file is corrupt or "not a database" — moves it aside together with its ``-wal``/``-shm``
files to ``<path>.corrupt-<UTC time>`` (kept for forensics) so a fresh outbox can start;
the caller raises the health alarm (``salvage_hint`` gives its advice). The fresh outbox
starts its seqs above the moved file's last seq where that can be read, so ``edge outbox
salvage`` can re-queue the moved file's events under their own seqs
(``edge.outbox.salvage``). ``open_checked`` returns the new path of the moved file, or
None when all is well.

Anything else that stops a check (a lock held by another process, a busy timeout, a
permission problem, a ``-wal``/``-shm`` file that cannot be opened, an I/O error) says
nothing about the data: ``OutboxOpenError`` is raised, the file stays where it is, and
``edge run`` exits 2 with the reason (an intact outbox is never discarded for a lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import platform
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from edge.errors import OutboxOpenError
from edge.telemetry import log_event
from edge.timefmt import utc_iso

__all__ = ["MARKER_SUFFIX", "BackgroundCheck", "EarlyCheck", "cheap_check", "corrupt_advice",
           "mark_corrupt", "marked_problem", "open_checked", "quick_check", "salvage_hint"]

log = logging.getLogger(__name__)


BUSY_TIMEOUT_MS = 10_000
MARKER_SUFFIX = ".corrupt-detected"
"""Next to the outbox: a corrupt verdict of a run-time check, honoured by the next start."""
DEFER_RETRY_S = 600.0
"""A check that gave way to intake (WAL guard, ``BackgroundCheck``) runs again this much later."""
CHECK_CACHE_KIB = 1024
"""Page cache of the background check's connection: it reads every page once, a larger
cache would only hold memory the daemon's own connections use better."""
_VERDICT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_MAGIC = b"SQLite format 3\x00"


def _is_verdict(err: sqlite3.Error) -> bool:
    """True when SQLite judged the file itself (corrupt, not a database)."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _VERDICT_CODES
    text = str(err)
    return "not a database" in text or "malformed" in text


def header_problem(path: str) -> str | None:
    """What is wrong with the file's 100-byte header and its length, or None.

    The length must be whole pages; the page count the header records must fit in the file
    unless a WAL with frames is beside it (a checkpoint cut short by a crash leaves the
    rest in the WAL, which SQLite reads first).
    """
    with open(path, "rb") as f:
        head = f.read(100)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 100 or not head.startswith(_MAGIC):
        return "file is not a database (no SQLite header)"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return f"header destroyed: page size {page} is not a power of two from 512"
    if size % page:
        return f"file length {size} is not a whole number of {page}-byte pages"
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the page count is valid only with this match
    wal = path + "-wal"
    wal_frames = os.path.exists(wal) and os.path.getsize(wal) > 32
    if valid and pages * page > size and not wal_frames:
        return f"file truncated: the header counts {pages} pages, the file holds {size // page}"
    return None


def cheap_check(path: str) -> str | None:
    """None when the file passes the start-up check (see module doc); else the problem.

    Raises ``OutboxOpenError`` when the check could not judge the file.
    """
    try:
        problem = header_problem(path)
    except OSError as err:
        raise OutboxOpenError(f"cannot read the outbox file {path}: {err}. The file was "
                              "left as it is (this is not corruption)") from err
    if problem is not None:
        return problem
    conn = _connect_ro(path)
    if isinstance(conn, str):
        return conn
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA schema_version").fetchone()  # opens: WAL recovery, schema read
        conn.execute("PRAGMA user_version").fetchone()
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND rootpage > 0")]
        for name in tables:
            quoted = '"' + name.replace('"', '""') + '"'
            conn.execute(f"SELECT 1 FROM {quoted} LIMIT 1").fetchall()
    except sqlite3.Error as err:
        if _is_verdict(err):
            return str(err)
        raise _unavailable(path, err) from err
    finally:
        conn.close()
    return None


def _connect_ro(path: str) -> sqlite3.Connection | str:
    """A read-only connection, or SQLite's verdict on the file as text."""
    try:
        # read-only: closing it never checkpoints a WAL a crash left behind (the writer
        # opened next does that as part of normal work instead of the check's close)
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as err:
        if _is_verdict(err):
            return str(err)
        raise _unavailable(path, err) from err


def quick_check(path: str, *, cache_kib: int | None = None,
                on_open: Callable[[sqlite3.Connection], None] | None = None) -> str | None:
    """None when the file passes ``PRAGMA quick_check`` (every page read); otherwise the
    problem found. ``cache_kib`` bounds the connection's page cache; ``on_open`` gets the
    connection before the check (``interrupt()`` from another thread stops it).

    Raises ``OutboxOpenError`` when the check could not judge the file (see module doc).
    """
    conn = _connect_ro(path)
    if isinstance(conn, str):
        return conn
    try:
        if on_open is not None:
            on_open(conn)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if cache_kib is not None:
            conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        # no mmap_size here: a mapped check is ~13 % faster but counts the whole file in
        # the daemon's RSS (1.2 GB peak with 1M events queued, seen by the OOM killer)
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.Error as err:
        if _is_verdict(err):  # "file is not a database", malformed header
            return str(err)
        raise _unavailable(path, err) from err
    finally:
        conn.close()
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows)


def _unavailable(path: str, err: sqlite3.Error) -> OutboxOpenError:
    name = getattr(err, "sqlite_errorname", "") or type(err).__name__
    return OutboxOpenError(
        f"cannot check the outbox file {path}: {err} ({name}). The file was left as it is "
        "(this is not corruption): check that no other process holds it (a second "
        "gateway, a backup tool), that the service user can read and write the file and "
        "its -wal/-shm files and their folder, and that the disk is healthy")


class EarlyCheck:
    """``cheap_check`` started on a thread as the daemon starts, so SQLite's open (with its
    WAL recovery after a crash) runs while Python imports and validates the configuration.
    ``open_checked`` uses its verdict for that path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problem: str | None = None
        self.error: OutboxOpenError | None = None
        self._thread = threading.Thread(target=self._run, name="outbox-early-check",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            try:
                self.problem = cheap_check(self.path)
            except OutboxOpenError as err:
                self.error = err

    def verdict(self, path: str) -> tuple[bool, str | None]:
        """(known, problem): known is False when this check was for another path.
        Raises the check's ``OutboxOpenError``."""
        if os.path.abspath(path) != os.path.abspath(self.path):
            return False, None
        self._thread.join()
        if self.error is not None:
            raise self.error
        return True, self.problem


def open_checked(path: str, early: EarlyCheck | None = None) -> str | None:
    """Check ``path`` cheaply (or take ``early``'s verdict) and honour a run-time verdict
    left by the last run (``MARKER_SUFFIX``); move a corrupt file aside and return where it
    went, or None when the file is fine or absent."""
    problem = marked_problem(path)
    if problem is None:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return None
        known, problem = early.verdict(path) if early is not None else (False, None)
        if not known:
            problem = cheap_check(path)
    if problem is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, target + suffix)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + MARKER_SUFFIX)  # done: its problem is in the log line below
    last_seq, queued = _start_fresh_after(target, path)
    _HINTS[target] = salvage_hint(target, queued)
    log_event(log, logging.ERROR, "outbox file is corrupt; moved aside, starting a fresh one",
              problem=problem[:300], moved_to=target, queued_rows=queued,
              last_seq=last_seq, salvage=f"edge outbox salvage {target} -c CONFIG")
    return target


# ---------------------------------------------------------------- run-time verdict marker


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def mark_corrupt(path: str, problem: str) -> None:
    """Persist a run-time corrupt verdict on ``path`` for the next start (durable: written,
    fsynced, renamed into place, folder fsynced). Names the file by device and inode, so a
    file an operator put in its place later is not judged by it."""
    marker = path + MARKER_SUFFIX
    doc = {"problem": problem[:2000], "found_at": utc_iso(time.time()),
           "file": _identity(path)}
    tmp = marker + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def marked_problem(path: str) -> str | None:
    """The problem a run-time check recorded for the file now at ``path``, or None. A
    marker of another file (replaced, or gone) or an unreadable one is removed with a line
    in the log: only the check of this very file may move it aside."""
    marker = path + MARKER_SUFFIX
    try:
        with open(marker, encoding="utf-8") as f:
            doc = json.load(f)
        same = os.path.exists(path) and list(doc.get("file") or []) == _identity(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as err:
        doc, same = {"problem": f"unreadable marker: {err}"}, False
    if not same:
        log_event(log, logging.WARNING, "a corrupt verdict of an earlier run is for a file "
                  "no longer there; ignored", marker=marker, problem=str(doc.get("problem")))
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
        return None
    return (f"found by the integrity check of an earlier run at {doc.get('found_at')}: "
            f"{doc.get('problem')}")


# ---------------------------------------------------------------- background check


class _GaveWay(Exception):
    """The check was told to end before it read anything (stop, or the WAL guard)."""


class BackgroundCheck:
    """The full ``quick_check`` of the open outbox, beside intake (see module doc).

    ``start()`` runs it on its own thread at the lowest CPU and I/O priority; the state
    (``snapshot()``: ``pending``, ``running``, ``passed``, ``failed``, ``error``,
    ``deferred``, ``stopped``) is for ``/status``; ``stop()`` interrupts it. On a corrupt
    verdict, ``mark_corrupt`` is written first, then ``on_corrupt(problem)`` is called on
    the check's thread. A check that cannot judge (locked, I/O error) ends in ``error``:
    it says nothing about the data.

    WAL guard: while the check holds its snapshot no checkpoint can fold the WAL back, so
    intake grows it. When it has grown by ``max_wal_growth`` bytes (and never more than a
    quarter of the file system's free space found at the attempt's start), the check gives
    way: interrupted, ``deferred`` (no verdict), tried again after ``retry_s``.
    """

    def __init__(self, path: str, on_corrupt: Callable[[str], None] | None = None, *,
                 cache_kib: int = CHECK_CACHE_KIB, max_wal_growth: int | None = None,
                 retry_s: float = DEFER_RETRY_S, watch_s: float = 1.0) -> None:
        self.path = path
        self.on_corrupt = on_corrupt
        self.cache_kib = cache_kib
        self.max_wal_growth = max_wal_growth
        self.retry_s = retry_s
        self.watch_s = watch_s
        self.state = "pending"
        self.problem: str | None = None
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.next_attempt_at: float | None = None
        self.took_s: float | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._stopping = False
        self._deferring = False
        self._wake = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-integrity-check",
                                        daemon=True)
        self.state, self.started_at = "running", time.time()
        self._thread.start()

    def _run(self) -> None:
        _lower_priority()
        while self._attempt() == "deferred":
            self.next_attempt_at = time.time() + self.retry_s
            if self._wake.wait(self.retry_s):
                self._finish("stopped", time.monotonic())
                return

    def _attempt(self) -> str:
        """One check; returns its outcome (``deferred``: try again later)."""
        started = time.monotonic()
        self.attempts += 1
        self.state, self.started_at, self.next_attempt_at = "running", time.time(), None
        self._deferring = False
        if self._stopping:
            return self._finish("stopped", started)
        attempt_over = threading.Event()
        threading.Thread(target=self._guard_wal, args=(self._wal_bound(), attempt_over),
                         name="outbox-integrity-wal-guard", daemon=True).start()
        try:
            problem = quick_check(self.path, cache_kib=self.cache_kib, on_open=self._opened)
        except Exception as err:  # noqa: BLE001 - any failure to judge is no verdict
            if self._stopping:
                return self._finish("stopped", started)
            if self._deferring:
                self.state = "deferred"
                log_event(log, logging.WARNING, "outbox integrity check deferred: intake "
                          "grew the WAL while the check held its snapshot; tried again later",
                          retry_in_s=self.retry_s, attempt=self.attempts)
                return "deferred"
            self.problem = str(err)
            log_event(log, logging.WARNING, "outbox integrity check could not run; the file "
                      "is not judged", error=str(err)[:300])
            return self._finish("error", started)
        finally:
            attempt_over.set()
        if problem is None:
            self._finish("passed", started)
            log_event(log, logging.INFO, "outbox integrity check passed",
                      took_s=round(self.took_s or 0, 2), attempt=self.attempts)
            return "passed"
        self.problem = problem
        try:
            mark_corrupt(self.path, problem)
        except OSError as err:
            log_event(log, logging.ERROR, "cannot record the corrupt verdict for the next "
                      "start", error=str(err))
        self._finish("failed", started)
        if self.on_corrupt is not None:
            self.on_corrupt(problem)
        return "failed"

    def _wal_bound(self) -> int:
        """The WAL size at which this attempt gives way."""
        wal = _file_size(self.path + "-wal")
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            room = st.f_bavail * st.f_frsize // 4
        except OSError:
            room = 1 << 62
        growth = room if self.max_wal_growth is None else min(room, self.max_wal_growth)
        return wal + growth

    def _guard_wal(self, bound: int, over: threading.Event) -> None:
        while not over.wait(self.watch_s):
            if _file_size(self.path + "-wal") > bound:
                self._deferring = True
                conn = self._conn
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.interrupt()
                return

    def _opened(self, conn: sqlite3.Connection) -> None:
        if self._stopping or self._deferring:
            raise _GaveWay("the check gave way before it started")
        self._conn = conn

    def stop(self) -> None:
        """Interrupt a running check and cancel a deferred one; state ``stopped``."""
        self._stopping = True
        self._wake.set()
        conn = self._conn
        if conn is not None and not self.done.is_set():
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def _finish(self, state: str, started: float) -> str:
        self._conn = None
        self.took_s = time.monotonic() - started
        self.finished_at = time.time()
        self.state = state
        self.done.set()
        return state

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the check to end (a deferred check has not); True when it has."""
        return self.done.wait(timeout)

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` view: state, times, attempts, the problem found (failed, error)
        and the next attempt of a deferred check."""
        return {
            "state": self.state,
            "started_at": utc_iso(self.started_at) if self.started_at else None,
            "finished_at": utc_iso(self.finished_at) if self.finished_at else None,
            "took_s": round(self.took_s, 2) if self.took_s is not None else None,
            "attempts": self.attempts,
            "next_attempt_at": utc_iso(self.next_attempt_at) if self.next_attempt_at else None,
            "problem": self.problem[:300] if self.problem else None,
        }


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
_IOPRIO_BEST_EFFORT_LOWEST = (2 << 13) | 7


def _lower_priority() -> None:
    """Nice 19 and the lowest best-effort I/O priority for the calling thread (Linux: both
    apply per thread); best effort, silently skipped where unsupported."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    if _IOPRIO_SET is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(_IOPRIO_SET, 1, tid, _IOPRIO_BEST_EFFORT_LOWEST)  # 1: one thread


def corrupt_advice(path: str, problem: str) -> str:
    """What the alarm and ``/readyz`` say about a corrupt verdict of the running check."""
    return (f"the outbox file {path} is corrupt (found by the integrity check while "
            f"running: {problem[:200]}); new events are not acknowledged (the upstream keeps "
            "them). Restart the gateway: it moves the file aside and starts a fresh outbox; "
            "then re-queue the moved file's events with: edge outbox salvage "
            f"{path}.corrupt-<time> -c <this gateway's config file>")


_HINTS: dict[str, str] = {}


def salvage_hint(target: str, queued: int | None = None) -> str:
    """What the alarm tells an operator about a moved file: what it seemed to hold and the
    command that re-queues its events."""
    if queued is None and target in _HINTS:
        return _HINTS[target]
    held = ("it held an unknown number of queued delivery rows" if queued is None else
            f"it held {queued} queued delivery row(s)")
    return (f"{held}; re-queue what can be read with: edge outbox salvage {target} "
            "-c <this gateway's config file>")


def _start_fresh_after(moved: str, path: str) -> tuple[int | None, int | None]:
    """Read the moved file's last seq and queued rows (cheap, read-only, None where
    unreadable) and create the fresh outbox with its seqs above that last seq, so salvaged
    events can keep their seqs and go before newer events of their key."""
    from edge.outbox.dbthread import connect
    from edge.outbox.queries import ensure_schema
    from edge.outbox.salvage import SEQ_FLOOR_KEY, peek

    last_seq, queued = peek(moved)
    if not last_seq:
        return last_seq, queued
    conn = connect(path)
    try:
        ensure_schema(conn)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                         [("last_seq", str(last_seq)), (SEQ_FLOOR_KEY, str(last_seq))])
        conn.execute("COMMIT")
    finally:
        conn.close()
    return last_seq, queued
