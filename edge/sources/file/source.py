"""The file source at run time: scan → take a complete file → map its rows → commit → move.

See ``edge.sources.file`` for the contract. One file at a time, oldest first::

    watcher wakes (inotify / poll) ─▶ scan (thread): match names, completeness
        ─▶ check (thread): size limit, read, SHA-256, count rows (FileRejected → rejected/)
        ─▶ rows in batches of max_batch (thread: parse; loop: map) ─▶ submit (chain: source)
              invalid rows → quarantine once the file has a valid row
        ─▶ every event committed ─▶ move to done/ (then the marker goes) ─▶ audit

Each row's dedupe key is an identity (``redelivery_only=False``): the file's SHA-256 and
the row's index, or the entry's ``dedupe_key`` template. A file read again after a crash
(it stays in the folder until its move) maps row by row to the events stored the first
time, within ``outbox.dedupe_window_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import itertools
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.plugin import (
    ComponentContext,
    ConfigError,
    FatalStartupError,
    Ingest,
    InputError,
    Mapper,
    OutboxClosedError,
    OutboxError,
    OutboxFullError,
    Submission,
    log_event,
)
from edge.sources.file.config import FileEntryConfig, FileSourceConfig, NamePattern
from edge.sources.file.parse import FileRejected, Row, decode, format_for, iter_rows
from edge.sources.file.watch import InotifyWatcher, Watcher, inotify_available
from edge.timefmt import utc_iso

__all__ = ["FileSource"]

log = logging.getLogger("edge.sources.file")

_RETRY_MIN_S = 0.5  # backoff of a failed write: doubles per failure, capped
_RETRY_MAX_S = 30.0
_SAFETY_RESCAN_S = 30.0  # with inotify: rescan at least this often anyway
_REASON_SUFFIX = ".reason"
_HOLD_S = 30.0  # retry an unreadable or unmovable file after this long


@dataclass(slots=True)
class _Entry:
    config: FileEntryConfig
    pattern: NamePattern
    mapper: Mapper


@dataclass(slots=True)
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time the file was first seen with this size and mtime


@dataclass(slots=True)
class _Candidate:
    name: str
    entry: _Entry
    captures: dict[str, str]
    size: int
    mtime_ns: int
    marker: bool = False


@dataclass(slots=True)
class _Invalid:
    row: int  # 1-based
    line: int | None
    reason: str
    detail: str
    raw: bytes


@dataclass
class _Outcome:
    events: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: list[_Invalid] = field(default_factory=list)
    quarantined: int = 0


class FileSource:
    """``type: file`` at run time; built by ``edge.sources.file._factory`` (no I/O)."""

    def __init__(self, cfg: FileSourceConfig, ctx: ComponentContext) -> None:
        if ctx.ingest is None:
            raise ConfigError("a file source needs the ingest pipeline", location=cfg.id)
        self.id = cfg.id
        self.cfg = cfg
        self.ctx = ctx
        self.ingest: Ingest = ctx.ingest
        self.folder = Path(cfg.path)
        self.done_dir = self.folder / cfg.done_dir
        self.rejected_dir = self.folder / cfg.rejected_dir
        self.entries = [_Entry(e, NamePattern(e.pattern),
                               Mapper(e, site=ctx.site, source=cfg.id)) for e in cfg.files]
        self._errors = ctx.metrics.source_errors
        self._seen: dict[str, _Seen] = {}
        self._ignored: set[str] = set()  # names no entry matches (logged once)
        # unreadable, or its move failed: left alone until it changes or _HOLD_S passed
        self._hold: dict[str, tuple[int, int, float]] = {}
        # committed but not yet moved (the move failed): only the move is retried
        self._committed: dict[str, tuple[int, int]] = {}
        self._conditions: dict[str, str | None] = {}
        self.watch_kind = "poll"
        self.counts = {"files_done": 0, "files_rejected": 0, "rows": 0, "stored": 0,
                       "duplicates": 0, "quarantined": 0}
        self.current: str | None = None
        self.last_file: dict[str, Any] | None = None
        self.waiting: list[str] = []

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """For ``/status``: folder, watcher, the file being read, counters."""
        return {"path": str(self.folder), "watch": self.watch_kind,
                "complete": self.cfg.complete, "current": self.current,
                "waiting": list(self.waiting[:20]), "last_file": self.last_file,
                **self.counts}

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Watch, take complete files, commit their rows, move them; until cancelled.

        Raises FatalStartupError only for ``watch: inotify`` where the OS has no inotify.
        A missing or unwritable folder is a condition (``/status``), retried, not a crash.
        """
        if self.cfg.watch == "inotify" and not inotify_available():
            raise FatalStartupError(
                f"source {self.id!r}: watch: inotify, but this system has no inotify "
                "(use watch: auto or poll)")
        watcher: Watcher | None = None
        try:
            while True:
                if not await asyncio.to_thread(self._folders_ready):
                    self.ctx.set_connected(False)
                    if watcher is not None:
                        watcher.close()
                        watcher = None
                    await asyncio.sleep(self.cfg.poll_interval_s)
                    continue
                if watcher is None or watcher.broken:
                    if watcher is not None:
                        watcher.close()
                    watcher = self._make_watcher()
                self.ctx.set_connected(True)
                ready, next_due = await asyncio.to_thread(self._scan)
                self.waiting = [c.name for c in ready]
                for cand in ready:
                    try:
                        await self._take(cand)
                    except OutboxClosedError:
                        return  # shutting down: the file stays and is read again
                    self.waiting.remove(cand.name)
                if ready:
                    continue  # files may have arrived meanwhile
                await watcher.wait(self._timeout(next_due, watcher))
        finally:
            if watcher is not None:
                watcher.close()
            self.current = None
            self.ctx.set_connected(False)

    def _make_watcher(self) -> Watcher:
        if self.cfg.watch != "poll":
            try:
                watcher: Watcher = InotifyWatcher(str(self.folder))
            except OSError as err:
                if self.cfg.watch == "inotify":
                    raise
                self._note_once("inotify", logging.INFO,
                                f"inotify not usable ({err}); polling the folder")
            else:
                self.watch_kind = "inotify"
                return watcher
        self.watch_kind = "poll"
        return Watcher()

    def _timeout(self, next_due: float | None, watcher: Watcher) -> float:
        base = (self.cfg.poll_interval_s if watcher.kind == "poll"
                else max(_SAFETY_RESCAN_S, self.cfg.poll_interval_s))
        if next_due is not None:
            base = min(base, max(0.05, next_due - time.monotonic()))
        return base

    # ------------------------------------------------------------------ folders

    def _folders_ready(self) -> bool:
        """(thread) The drop folder is readable and done/ rejected/ exist and are writable;
        otherwise name the problem as a condition."""
        folder = self.folder
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            self._condition("drop_folder", f"drop folder {folder} {what}", "critical")
            return False
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            self._condition("drop_folder", f"drop folder {folder} is not readable and "
                            "writable by the gateway (files cannot be moved out)", "critical")
            return False
        self._condition("drop_folder", None)
        for d in (self.done_dir, self.rejected_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
                if not os.access(d, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "not writable")
            except OSError as err:
                self._condition("folder_unwritable",
                                f"cannot use {d}: {err.strerror or err}", "critical")
                return False
        self._condition("folder_unwritable", None)
        return True

    def _condition(self, code: str, message: str | None, severity: str = "warning") -> None:
        if self._conditions.get(code) == message:
            return
        self._conditions[code] = message
        if message is not None:
            self._errors.labels(self.id, code).inc()
            log_event(log, logging.ERROR if severity == "critical" else logging.WARNING,
                      message, source=self.id, code=code)
        self.ctx.set_condition(code, message, severity)

    # ------------------------------------------------------------------ scan

    def _match(self, name: str) -> tuple[_Entry, dict[str, str]] | None:
        for entry in self.entries:
            captures = entry.pattern.match(name)
            if captures is not None:
                return entry, captures
        return None

    def _scan(self) -> tuple[list[_Candidate], float | None]:
        """(thread) The complete files, oldest first, and when the next one may settle."""
        cfg = self.cfg
        now = time.monotonic()
        try:
            listing = {e.name: e for e in os.scandir(self.folder)}
        except OSError:
            return [], None
        marker = cfg.complete == "marker"
        ready: list[_Candidate] = []
        next_due: float | None = None
        present: set[str] = set()
        for name, ent in listing.items():
            if name.startswith(".") or (marker and name.endswith(cfg.marker_suffix)):
                continue  # hidden (an upload in progress by convention) or a marker
            try:
                if not ent.is_file():
                    continue
                st = ent.stat()
            except OSError:
                continue
            present.add(name)
            found = self._match(name)
            if found is None:
                if name not in self._ignored:
                    self._ignored.add(name)
                    log_event(log, logging.WARNING,
                              "file matches no files[].pattern: left in the drop folder",
                              source=self.id, file=name)
                continue
            entry, captures = found
            cand = _Candidate(name, entry, captures, st.st_size, st.st_mtime_ns)
            held = self._hold.get(name)
            if held is not None and held[:2] == (st.st_size, st.st_mtime_ns) and now < held[2]:
                next_due = held[2] if next_due is None else min(next_due, held[2])
                continue
            if marker:
                m = listing.get(name + cfg.marker_suffix)
                try:
                    # a marker older than the file is a leftover of an earlier file
                    if m is None or m.stat().st_mtime_ns < st.st_mtime_ns:
                        continue
                except OSError:
                    continue
                cand.marker = True
                ready.append(cand)
                continue
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                seen = self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, now)
            due = seen.since + cfg.settle_s
            if now >= due:
                ready.append(cand)
            else:
                next_due = due if next_due is None else min(next_due, due)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for gone in set(self._hold) - present:
            del self._hold[gone]
        for gone in set(self._committed) - present:
            del self._committed[gone]
        self._ignored &= present
        ready.sort(key=lambda c: (c.mtime_ns, c.name))
        return ready, next_due

    # ------------------------------------------------------------------ one file

    async def _take(self, cand: _Candidate) -> None:
        """Commit every row of ``cand``, then move it to done/ — or reject it. Returns
        when the file is dealt with or was left for a later scan (unreadable, move
        failed). Raises OutboxClosedError at shutdown (the file stays)."""
        name = cand.name
        self.current = name
        try:
            if self._committed.get(name) == (cand.size, cand.mtime_ns):
                await self._finish(cand, None, None)  # only the move was left to do
                return
            try:
                text, sha, total = await asyncio.to_thread(self._load, cand)
            except FileNotFoundError:
                return  # taken away meanwhile
            except FileRejected as err:
                await self._reject(cand, err, sha=None)
                return
            except OSError as err:
                self._hold_back(cand)
                self._errors.labels(self.id, "file_unreadable").inc()
                log_event(log, logging.ERROR, "cannot read a file: left in the drop folder, "
                          f"tried again in {_HOLD_S:g} s or when it changes", source=self.id,
                          file=name, error=err.strerror or str(err))
                return
            if isinstance(total, FileRejected):
                await self._reject(cand, total, sha=sha)
                return
            await self._audit("file_taken", None, {"file": name, "sha256": sha, "rows": total,
                                                   "bytes": cand.size})
            outcome = await self._store_rows(cand, text, sha)
            if outcome.stored + outcome.duplicates == 0:
                first = outcome.invalid[:3]
                detail = "; ".join(f"row {i.row}" + (f" (line {i.line})" if i.line else "")
                                   + f": {i.reason}: {i.detail}" for i in first)
                await self._reject(cand, FileRejected(
                    "all_rows_invalid", f"none of {total} rows maps to an event; {detail}",
                    line=first[0].line if first else None,
                    row=first[0].row if first else None), sha=sha, invalid=outcome.invalid)
                return
            self._committed[name] = (cand.size, cand.mtime_ns)
            await self._finish(cand, sha, outcome)
        finally:
            self.current = None

    def _load(self, cand: _Candidate) -> tuple[str, str, int | FileRejected]:
        """(thread) Read, hash and check the file: (text, sha256, row count) — the count
        is a FileRejected when the content is unusable. Raises FileRejected before reading
        for a size over the limit, OSError when it cannot be read."""
        limit = self.cfg.max_file_bytes
        if cand.size > limit:
            raise FileRejected("too_large", f"{cand.size} bytes > max_file_bytes {limit}")
        with open(self.folder / cand.name, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileRejected("too_large", f"more than max_file_bytes {limit} bytes")
        sha = hashlib.sha256(data).hexdigest()
        try:
            fmt = self._format(cand)
            text = decode(data, cand.entry.config.encoding)
            total = sum(1 for _ in self._rows(cand, text, fmt))
        except FileRejected as err:
            return "", sha, err
        if total == 0:
            return "", sha, FileRejected("no_rows", "the file holds no records")
        return text, sha, total

    def _format(self, cand: _Candidate) -> str:
        fmt = format_for(cand.name, cand.entry.config.format)
        if fmt is None:
            raise FileRejected("unknown_format", "no format for this extension (set the "
                               "entry's format: csv, json or jsonl)")
        return fmt

    def _rows(self, cand: _Candidate, text: str, fmt: str) -> Iterator[Row]:
        return iter_rows(text, fmt, delimiter=cand.entry.config.delimiter,
                         max_rows=self.cfg.max_rows)

    async def _store_rows(self, cand: _Candidate, text: str, sha: str) -> _Outcome:
        """Map and commit every row in batches (chain: this source, in file order).
        Invalid rows are quarantined once the file is known to have a valid row; a file
        without one stores nothing (the caller rejects it).

        The next batch is mapped while the previous one commits; it is submitted only
        after that commit returned, so a retried batch is never overtaken."""
        out = _Outcome()
        rows = self._rows(cand, text, self._format(cand))
        entry = cand.entry
        committing: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await asyncio.to_thread(
                    lambda: list(itertools.islice(rows, self.cfg.max_batch)))
                if not batch:
                    break
                items: list[tuple[Submission, Row]] = []
                for row in batch:
                    sub = self._map(cand, entry, row, sha, out)
                    if sub is not None:
                        items.append((sub, row))
                self.counts["rows"] += len(batch)
                if committing is not None:
                    await committing
                    committing = None
                if items:
                    out.events += len(items)
                    committing = asyncio.create_task(self._commit(items, out),
                                                     name=f"file-{self.id}-commit")
                if out.events:
                    await self._quarantine_pending(cand, sha, out)
                await asyncio.sleep(0)  # let others run between batches of a large file
            if committing is not None:
                await committing
                committing = None
            if out.stored + out.duplicates:
                await self._quarantine_pending(cand, sha, out)
        finally:
            if committing is not None:
                committing.cancel()
                with contextlib.suppress(asyncio.CancelledError, OutboxClosedError):
                    await committing
        self.counts["stored"] += out.stored
        self.counts["duplicates"] += out.duplicates
        return out

    async def _commit(self, items: list[tuple[Submission, Row]], out: _Outcome) -> None:
        """Submit ``items``; a non-outbox exception (a bug storing one event) splits the
        batch, and the single event that still raises becomes an ``internal_error``
        quarantine record instead of stopping the file (and the source) for good."""
        try:
            ids = await self._submit([sub for sub, _ in items])
        except OutboxError:
            raise
        except Exception as err:  # noqa: BLE001 - one poisonous row must not block the folder
            if len(items) > 1:
                for one in items:
                    await self._commit([one], out)
                return
            row = items[0][1]
            out.invalid.append(_Invalid(row.index + 1, row.line, "internal_error",
                                        f"cannot store: {err!r}", row.raw))
            return
        for (sub, _), eid in zip(items, ids, strict=True):
            if eid == sub.event.id:
                out.stored += 1
            else:
                out.duplicates += 1

    def _map(self, cand: _Candidate, entry: _Entry, row: Row, sha: str, out: _Outcome
             ) -> Submission | None:
        n = row.index + 1
        if row.error is not None:
            out.invalid.append(_Invalid(n, row.line, *row.error, row.raw))
            return None
        captures: dict[str, Any] = dict(cand.captures)
        if entry.config.provenance:
            captures["source_file"] = cand.name
            captures["source_row"] = n
        try:
            event, key = entry.mapper.map(row.value, captures)
        except InputError as err:
            out.invalid.append(_Invalid(n, row.line, err.reason, err.detail, row.raw))
            return None
        except Exception as err:  # noqa: BLE001 - hostile input must never stop the source
            out.invalid.append(_Invalid(n, row.line, "invalid_data", f"cannot map: {err!r}",
                                        row.raw))
            return None
        return Submission(event, key if key is not None else f"{sha}:{row.index}")

    async def _submit(self, items: list[Submission]) -> list[str]:
        """Commit ``items``; retried until committed. Raises OutboxClosedError only."""
        delay = _RETRY_MIN_S
        while True:
            try:
                return await self.ingest.submit(items, chain=self.id)
            except OutboxClosedError:
                raise
            except OutboxFullError:
                self._note_once("backpressure", logging.WARNING,
                                "outbox refuses events (budget full): the file stays in the "
                                "drop folder until its rows are stored")
                await self.ingest.wait_accepting()
            except OutboxError as err:
                self._errors.labels(self.id, "outbox_write").inc()
                log_event(log, logging.ERROR, "outbox write failed: the file stays, retrying",
                          source=self.id, error=str(err), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def _quarantine_pending(self, cand: _Candidate, sha: str, out: _Outcome) -> None:
        while out.quarantined < len(out.invalid):
            bad = out.invalid[out.quarantined]
            meta = {"file": cand.name, "row": bad.row, "line": bad.line, "sha256": sha}
            await self._write(functools.partial(
                self.ingest.quarantine, self.id, bad.reason, bad.raw[:65536], meta, bad.detail))
            out.quarantined += 1
            self.counts["quarantined"] += 1

    async def _write(self, call: Callable[[], Awaitable[None]]) -> None:
        """Run an outbox write (quarantine, audit) until committed; OutboxClosedError
        propagates."""
        delay = _RETRY_MIN_S
        while True:
            try:
                await call()
                return
            except OutboxClosedError:
                raise
            except OutboxFullError:
                await self.ingest.wait_accepting()
            except OutboxError as err:
                self._errors.labels(self.id, "outbox_write").inc()
                log_event(log, logging.ERROR, "outbox write failed, retrying",
                          source=self.id, error=str(err), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def _audit(self, state: str, reason: str | None, detail: dict[str, Any]) -> None:
        await self._write(functools.partial(self.ingest.audit, state, source=self.id,
                                            reason=reason, detail=detail))

    # ------------------------------------------------------------------ ack: move

    async def _finish(self, cand: _Candidate, sha: str | None, out: _Outcome | None) -> None:
        """Every event of the file is committed: move it to done/ (the ack)."""
        final = await self._move_or_hold(cand, self.done_dir, None,
                                         "its events are stored, the move is retried")
        if final is None:
            return
        self._committed.pop(cand.name, None)
        self._seen.pop(cand.name, None)
        self.counts["files_done"] += 1
        detail: dict[str, Any] = {"file": cand.name, "moved_to": final}
        if sha is not None and out is not None:
            detail.update(sha256=sha, events=out.events, stored=out.stored,
                          duplicates=out.duplicates, quarantined=out.quarantined)
        self.last_file = {"file": cand.name, "outcome": "done", "at": utc_iso(time.time()),
                          **detail}
        log_event(log, logging.INFO, "file done", source=self.id, **detail)
        if out is not None and out.duplicates and out.stored == 0:
            log_event(log, logging.INFO, "every row of the file was stored before (a file "
                      "read again after a restart, or the same content dropped again within "
                      "outbox.dedupe_window_s): nothing stored twice", source=self.id,
                      file=cand.name)
        await self._audit("file_done", None, detail)

    async def _reject(self, cand: _Candidate, err: FileRejected, *, sha: str | None,
                      invalid: list[_Invalid] | None = None) -> None:
        where = "".join(f", {k} {v}" for k, v in (("line", err.line), ("row", err.row)) if v)
        text = (f"file: {cand.name}\nreason: {err.reason}\ndetail: {err.detail}\n"
                + (f"line: {err.line}\n" if err.line else "")
                + (f"row: {err.row}\n" if err.row else "")
                + (f"sha256: {sha}\n" if sha else "")
                + f"rejected_at: {utc_iso(time.time())}\nsource: {self.id}\n")
        for bad in (invalid or [])[:50]:
            text += (f"row {bad.row}" + (f" (line {bad.line})" if bad.line else "")
                     + f": {bad.reason}: {bad.detail}\n")
        final = await self._move_or_hold(cand, self.rejected_dir, text, "retried")
        if final is None:
            return
        self._seen.pop(cand.name, None)
        self.counts["files_rejected"] += 1
        self._errors.labels(self.id, "file_rejected").inc()
        detail = {"file": cand.name, "moved_to": final, "reason": err.reason,
                  "detail": err.detail[:500], "line": err.line, "row": err.row,
                  "sha256": sha}
        self.last_file = {"outcome": "rejected", "at": utc_iso(time.time()), **detail}
        log_event(log, logging.WARNING, f"file rejected: {err.reason}{where}",
                  source=self.id, file=cand.name, moved_to=final, detail=err.detail[:200])
        await self._audit("file_rejected", err.reason, detail)

    async def _move_or_hold(self, cand: _Candidate, target: Path, reason_text: str | None,
                            then: str) -> str | None:
        """Move the file (``_move``, in a thread); its final name, or None when it vanished
        meanwhile or the move failed (held back, ``move_failed`` condition saying
        ``then`` every few seconds)."""
        try:
            final = await asyncio.to_thread(self._move, cand, target, reason_text)
        except FileNotFoundError:
            self._vanished(cand)
            return None
        except OSError as err:
            self._hold_back(cand)
            self._condition("move_failed", f"cannot move {cand.name} to {target}: "
                            f"{err.strerror or err}; {then} every {_HOLD_S:g} s")
            return None
        self._condition("move_failed", None)
        return final

    def _move(self, cand: _Candidate, target: Path, reason_text: str | None = None) -> str:
        """(thread) Move the file into ``target`` under a name not taken there (a clash
        gets ``-1``, ``-2`` … before the extension), write its ``.reason`` beside it when
        given, then remove its marker. Returns the final name."""
        src = self.folder / cand.name
        if not target.is_dir():  # not FileNotFoundError: that means the file went away
            raise NotADirectoryError(errno.ENOTDIR, "no such folder", str(target))
        final = _place(src, target, cand.name)
        if reason_text is not None:
            with open(target / (final + _REASON_SUFFIX), "w", encoding="utf-8") as f:
                f.write(reason_text)
        if cand.marker:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / (cand.name + self.cfg.marker_suffix))
        return final

    def _vanished(self, cand: _Candidate) -> None:
        """The file was taken away by someone else before its move: nothing to move."""
        self._committed.pop(cand.name, None)
        self._seen.pop(cand.name, None)
        log_event(log, logging.WARNING, "file removed from the drop folder by someone else "
                  "before it was moved", source=self.id, file=cand.name)

    def _hold_back(self, cand: _Candidate) -> None:
        self._hold[cand.name] = (cand.size, cand.mtime_ns, time.monotonic() + _HOLD_S)

    def _note_once(self, code: str, level: int, message: str) -> None:
        if self._conditions.get("note:" + code) != message:
            self._conditions["note:" + code] = message
            log_event(log, level, message, source=self.id, code=code)


def _candidates(name: str) -> Iterator[str]:
    yield name
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension (or only a leading dot)
        stem, dot, ext = name, "", ""
    for n in itertools.count(1):
        yield f"{stem}-{n}{dot}{ext}"


def _place(src: Path, target: Path, name: str) -> str:
    """Move ``src`` into folder ``target`` without replacing any file there; the name
    used. A hard link claims the name atomically (EEXIST: try the next); where links are
    not possible (another file system, no link support) the file is copied first."""
    for cand in _candidates(name):
        dst = target / cand
        try:
            os.link(src, dst)
        except FileExistsError:
            continue
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                 errno.EMLINK):
                raise
            if dst.exists() or (target / (cand + _REASON_SUFFIX)).exists():
                continue
            tmp = target / f".{cand}.partial"
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, dst)
            except FileExistsError:
                os.unlink(tmp)
                continue
            except OSError:
                os.replace(tmp, dst)  # no links at all there: the clash check above holds
            else:
                os.unlink(tmp)
            os.unlink(src)
            return cand
        if (target / (cand + _REASON_SUFFIX)).exists():
            # an old reason file of that name would describe the wrong file: keep looking
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            continue
        os.unlink(src)
        return cand
    raise AssertionError("unreachable")
