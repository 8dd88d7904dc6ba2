"""``type: file`` — take LIMS results, certificates of analysis and CMM reports dropped in a
folder (CSV, JSON, JSON lines) and store each row as a canonical event.

Contract (DESIGN invariants 1, 2 and 3):
- A file is taken only when complete: its size and mtime unchanged for ``settle_s``
  (``complete: settle``), or once ``<name><marker_suffix>`` exists (``complete: marker``).
  Hidden files (``.name``) are never taken: write under a hidden name, then rename.
- Ack = move: the file moves to ``done_dir`` only after every event of it is committed to
  the outbox (``ingest.submit`` returned); its marker is removed after the move. Until
  then it stays where it was. A name already taken in ``done_dir`` is never replaced: the
  file gets ``-1``, ``-2`` … before its extension.
- No duplicates after a crash: a row's dedupe key is an identity, the file's SHA-256 and
  the row's index (or the entry's ``dedupe_key`` template). A file read again — after a
  ``kill -9`` between commits, or before its move — maps row by row to the events stored
  the first time (``outbox.dedupe_window_s``), so nothing is stored or sent twice. The
  same content dropped again within that window maps to the first events as well.
- A file unusable as a whole (too large, too many rows, wrong encoding, unparsable, no
  records, every record invalid) moves to ``rejected_dir`` with ``<name>.reason``
  naming the reason and the line or row; nothing of it is stored. Invalid rows of a file
  that has valid ones are quarantined (reason, file, row and line) and the rest is stored.
- Backpressure and storage faults: nothing is moved; the same rows are retried (after
  ``wait_accepting`` for a full outbox, with backoff for a write error).
- A missing or unwritable folder is a condition in ``/status``, retried; not a crash.

Every option and the operator-facing guarantees: ``README.md`` beside this file; a
complete commented source: ``sample.yaml``. This module holds the config model only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.plugin import ComponentType
from edge.sources.file.config import FileEntryConfig, FileSourceConfig

if TYPE_CHECKING:
    from edge.plugin import ComponentContext, Source

__all__ = ["COMPONENT", "FileEntryConfig", "FileSourceConfig"]


def _factory(cfg: FileSourceConfig, ctx: ComponentContext) -> Source:
    from edge.sources.file.source import FileSource

    return FileSource(cfg, ctx)


COMPONENT = ComponentType(
    kind="source",
    type="file",
    config_model=FileSourceConfig,
    factory=_factory,
    description="drop folder of CSV / JSON / JSON lines files, moved to done/ after commit",
)
