"""The file source when the outbox refuses events or fails to write: the file stays where it
is and the same rows are submitted again once the outbox accepts. And when storing one
row's event raises something else (a bug): that row is quarantined, the file finishes.

A full outbox or a storing bug is hard to provoke on purpose with the real outbox in a
few seconds, so the ingest seam is a fake here (the ``Ingest`` protocol of
``edge.plugin``); the real outbox's side is tested in ``tests/outbox``. The folder, the
files and their moves are real.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edge.plugin import (
    ComponentContext,
    Metrics,
    OutboxError,
    OutboxFullError,
    Submission,
)
from edge.sources.file import COMPONENT, FileSourceConfig
from tests.support import eventually


class FakeIngest:
    """Refuses (``refuse`` = an exception to raise) until told otherwise; then stores each
    dedupe key once, like the outbox."""

    def __init__(self) -> None:
        self.refuse: Exception | None = OutboxFullError("budget full")
        self.accepting = asyncio.Event()
        self.calls: list[list[str | None]] = []
        self.stored: dict[str | None, str] = {}
        self.audits: list[str] = []
        self.quarantined: list[tuple[str, dict[str, Any] | None]] = []
        self.poison: str | None = None  # a serial whose event makes storing raise (a bug)

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        self.calls.append([s.dedupe_key for s in items])
        if self.refuse is not None:
            raise self.refuse
        if any(s.event.data.get("serial") == self.poison for s in items):
            raise ValueError("a bug serialising this event")
        return [self.stored.setdefault(s.dedupe_key, s.event.id) for s in items]

    async def quarantine(self, source: str, reason: str, raw: bytes,
                         meta: dict[str, Any] | None = None, detail: str = "") -> None:
        self.quarantined.append((reason, meta))

    async def wait_accepting(self) -> None:
        await self.accepting.wait()

    async def audit(self, state: str, *, source: str, reason: str | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        self.audits.append(state)


def source(folder: Path, ingest: FakeIngest) -> Any:
    cfg = FileSourceConfig.model_validate({
        "id": "lims", "type": "file", "path": str(folder), "settle_s": 0,
        "poll_interval_s": 0.05, "max_batch": 2,
        "files": [{"pattern": "*.csv", "event": "inspection.result",
                   "fields": {"lot_id": "lot", "serial": "sn", "result": "result"}}]})
    return COMPONENT.factory(cfg, ComponentContext(site="s", state_dir=str(folder.parent),
                                                   metrics=Metrics(), ingest=ingest))


@pytest.mark.parametrize("refusal", ["full", "write_error"])
async def test_a_refused_write_keeps_the_file_and_retries_the_same_rows(
        refusal: str, tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    ingest = FakeIngest()
    if refusal == "write_error":
        ingest.refuse = OutboxError("disk I/O error")
    src = source(folder, ingest)
    (folder / "r.csv").write_text("lot,sn,result\nL1,a,pass\nL1,b,pass\nL1,c,pass\n")
    task = asyncio.create_task(src.run())
    try:
        await eventually(lambda: len(ingest.calls) >= 1, what="a submit")
        await asyncio.sleep(0.3)  # proves the file is not moved while refused
        assert (folder / "r.csv").exists() and not (folder / "done" / "r.csv").exists()
        ingest.refuse = None
        ingest.accepting.set()
        await eventually(lambda: (folder / "done" / "r.csv").exists(), what="moved")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    first = ingest.calls[0]
    assert len(first) == 2
    # the refused batch was submitted again, unchanged, before the next one
    retried = [c for c in ingest.calls if c == first]
    assert len(retried) >= 2
    assert ingest.calls[-1] != first and len(ingest.stored) == 3
    assert ingest.audits == ["file_taken", "file_done"]


async def test_a_row_whose_event_cannot_be_stored_is_quarantined_and_the_file_finishes(
        tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    ingest = FakeIngest()
    ingest.refuse, ingest.poison = None, "b"
    src = source(folder, ingest)
    (folder / "r.csv").write_text("lot,sn,result\nL1,a,pass\nL1,b,pass\nL1,c,pass\n")
    task = asyncio.create_task(src.run())
    try:
        await eventually(lambda: (folder / "done" / "r.csv").exists(), what="moved")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(ingest.stored) == 2
    [(reason, meta)] = ingest.quarantined
    assert reason == "internal_error" and meta is not None
    assert (meta["file"], meta["row"], meta["line"]) == ("r.csv", 2, 3)
