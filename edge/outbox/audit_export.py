"""Audit export: ship chained audit entries to a bundle folder (or an archive's URL) before
they are pruned.

A bundle is a folder of JSON-lines files ``audit-<first seq>-<last seq>.jsonl``, each
written whole (temporary name, fsync, rename), never changed afterwards. A file holds a
header line (``line: file``: seq range, counts), the checkpoints written since the previous
file (``line: checkpoint``) and the entries in seq order (``line: entry``), hashes
included, so the bundle verifies on its own (``edge audit verify --bundle DIR``): the same
walk as the outbox file's, from the genesis checkpoint (every checkpoint is exported).

Progress lives in the outbox's ``meta`` (``audit_exported_seq``,
``audit_exported_checkpoint``), updated after the file is durable. A crash between the two
writes the same entries again into the next file; the verifier accepts identical copies.
Retention pruning never removes an entry above ``audit_exported_seq``.

HTTP export POSTs each batch, in the same JSON-lines form, to ``audit.export.url``; a 2xx
answer counts as stored (the archive keeps the body as a bundle file under the name in
``X-Audit-Bundle``).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edge.config import AuditHttpExportConfig
from edge.outbox import audit
from edge.timefmt import utc_iso

__all__ = ["Batch", "BundleError", "ExportError", "bundle_bytes", "bundle_name",
           "mark_exported", "post_batch", "read_bundle", "read_pending", "verify_bundle",
           "write_bundle_file"]

FILE_GLOB = "audit-*.jsonl"


@dataclass
class Batch:
    entries: list[tuple[Any, ...]]
    checkpoints: list[tuple[Any, ...]]

    @property
    def last_seq(self) -> int | None:
        return int(self.entries[-1][0]) if self.entries else None

    @property
    def last_checkpoint(self) -> int | None:
        return int(self.checkpoints[-1][0]) if self.checkpoints else None


def _meta_int(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def read_pending(conn: sqlite3.Connection, max_rows: int) -> Batch | None:
    """Entries and checkpoints not exported yet (at most ``max_rows`` entries; one read
    snapshot); ``None`` when there is nothing new."""
    conn.execute("BEGIN")
    try:
        entries = conn.execute(
            f"SELECT {', '.join(audit.ENTRY_COLUMNS)} FROM audit WHERE seq > ? "
            "ORDER BY seq LIMIT ?", (_meta_int(conn, "audit_exported_seq"), max_rows)
        ).fetchall()
        checkpoints = conn.execute(
            f"SELECT {', '.join(audit.CHECKPOINT_COLUMNS)} FROM audit_checkpoints "
            "WHERE id > ? ORDER BY id", (_meta_int(conn, "audit_exported_checkpoint"),)
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    if not entries and not checkpoints:
        return None
    return Batch(entries, checkpoints)


def bundle_name(batch: Batch) -> str:
    """``audit-<first seq>-<last seq>-c<last checkpoint>.jsonl``: unique per batch."""
    first = int(batch.entries[0][0]) if batch.entries else 0
    return f"audit-{first:012d}-{batch.last_seq or 0:012d}-c{batch.last_checkpoint or 0:06d}.jsonl"


def bundle_bytes(batch: Batch) -> bytes:
    """The batch as bundle JSON lines: header, checkpoints, entries."""
    first = int(batch.entries[0][0]) if batch.entries else 0
    lines = [orjson.dumps({"line": "file", "first_seq": first, "last_seq": batch.last_seq or 0,
                           "entries": len(batch.entries), "checkpoints": len(batch.checkpoints),
                           "written_at": utc_iso()})]
    lines += [orjson.dumps({"line": "checkpoint",
                            **dict(zip(audit.CHECKPOINT_COLUMNS, c, strict=True))})
              for c in batch.checkpoints]
    lines += [orjson.dumps({"line": "entry", **dict(zip(audit.ENTRY_COLUMNS, e, strict=True))})
              for e in batch.entries]
    return b"\n".join(lines) + b"\n"


def write_bundle_file(folder: str, batch: Batch) -> Path:
    """Write ``batch`` as one new, durable bundle file; returns its path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    name = bundle_name(batch)
    tmp = out / (name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(bundle_bytes(batch))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return out / name


class ExportError(OSError):
    """The archive did not take a batch (HTTP error status, connection failure)."""


async def post_batch(cfg: AuditHttpExportConfig, batch: Batch) -> None:
    """POST the batch (bundle JSON lines) to ``cfg.url``; ``Idempotency-Key`` and
    ``X-Audit-Bundle`` carry the bundle file name, so a resent batch is recognisable.
    Raises ``ExportError`` unless the archive answers 2xx."""
    import httpx

    from edge.config import read_secret
    from edge.tls import TlsConfig, client_context

    name = bundle_name(batch)
    headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": name,
               "X-Audit-Bundle": name}
    if cfg.token_file:
        headers["Authorization"] = f"Bearer {read_secret(cfg.token_file)}"
    verify = client_context(TlsConfig(ca_file=cfg.ca_file), "audit.export")
    try:
        async with httpx.AsyncClient(verify=verify, timeout=cfg.timeout_s) as client:
            response = await client.post(cfg.url, content=bundle_bytes(batch), headers=headers)
    except httpx.HTTPError as err:
        raise ExportError(f"POST {cfg.url}: {err!r}") from err
    if not 200 <= response.status_code < 300:
        raise ExportError(f"POST {cfg.url}: HTTP {response.status_code} "
                          f"{response.text[:200]!r}")


def mark_exported(conn: sqlite3.Connection, batch: Batch) -> None:
    """Record the batch as shipped (writer transaction; marks only move forward)."""
    for key, value in (("audit_exported_seq", batch.last_seq),
                       ("audit_exported_checkpoint", batch.last_checkpoint)):
        if value is not None and value > _meta_int(conn, key):
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                         (key, str(value)))


class BundleError(Exception):
    """The bundle cannot be read (no such folder, a line that is not JSON ...)."""


def read_bundle(folder: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    """(entries by seq, checkpoints by id, highest seq named) of a bundle folder."""
    path = Path(folder)
    if not path.is_dir():
        raise BundleError(f"{folder}: not a folder")
    entries: list[tuple[Any, ...]] = []
    checkpoints: dict[int, tuple[Any, ...]] = {}
    head = 0
    files = sorted(path.glob(FILE_GLOB))
    if not files:
        raise BundleError(f"{folder}: no bundle files ({FILE_GLOB})")
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as err:
            raise BundleError(f"{file}: {err.strerror}") from err
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                kind = doc.get("line")
                if kind == "entry":
                    entries.append(tuple(doc[c] for c in audit.ENTRY_COLUMNS))
                elif kind == "checkpoint":
                    cp = tuple(doc[c] for c in audit.CHECKPOINT_COLUMNS)
                    if checkpoints.setdefault(int(doc["id"]), cp) != cp:
                        raise BundleError(f"{file}:{n}: checkpoint {doc['id']} differs from "
                                          "an earlier copy")
                elif kind == "file":
                    head = max(head, int(doc["last_seq"]))
                else:
                    raise BundleError(f"{file}:{n}: unknown line kind {kind!r}")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                    AttributeError) as err:
                raise BundleError(f"{file}:{n}: not a bundle line ({err})") from err
    entries.sort(key=lambda e: int(e[0]))
    return entries, [checkpoints[k] for k in sorted(checkpoints)], head


def verify_bundle(folder: str, key: bytes | None = None) -> audit.VerifyResult:
    """Verify an exported bundle on its own (raises ``BundleError`` when unreadable)."""
    entries, checkpoints, head = read_bundle(folder)
    head = max([head, *(int(e[0]) for e in entries[-1:])])
    top = max((int(c[0]) for c in checkpoints), default=0)
    return audit.verify(entries, checkpoints, head=lambda: (head, top), top_checkpoint=top,
                        key=key, rescan=lambda: entries)
