"""Pipeline: derived events are stored right after their cause (DESIGN invariant 4).

A real outbox in a temporary directory with the ``spec_limits`` rule; stored order is read
back by outbox sequence.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from edge.components import Submission
from edge.events import make_event
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.rules import SpecLimitsRule, build_rules


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    outbox = Outbox(tmp_path, router=lambda ev: ["erp"])
    await outbox.open()
    rule = SpecLimitsRule(type="spec_limits", lower=9.95, upper=10.05)
    try:
        yield Pipeline(outbox, build_rules([rule], "test-site"))
    finally:
        await outbox.close()


def result(lot: str, measured: float, serial: str, *, dedupe: str | None = None,
           redelivered: bool = False) -> Submission:
    """An inspection result as a source submits it (no ordering key configured)."""
    ev = make_event(type="inspection.result", site="test-site", source="line1",
                    data={"lot_id": lot, "serial": serial, "result": "pass",
                          "measured": measured})
    return Submission(ev, dedupe, redelivery_only=dedupe is not None,
                      redelivered=redelivered, redelivery_horizon=100)


def stored(pipeline: Pipeline) -> list[tuple[str, str, str | None, str | None]]:
    """(type, serial or inspection id, ordering key, correlation id) by seq."""
    conn = sqlite3.connect(pipeline.outbox.path)
    try:
        rows = conn.execute("SELECT type, ordering_key, body FROM events ORDER BY seq")
        out = []
        for type_, key, body in rows.fetchall():
            doc = orjson.loads(body)
            data = doc["data"]
            out.append((type_, data.get("serial") or data.get("inspection_event_id"), key,
                        doc["correlation_id"]))
        return out
    finally:
        conn.close()


async def test_derived_events_follow_their_cause_in_the_middle_of_a_batch(
        pipeline: Pipeline) -> None:
    r1, r2 = result("A", 10.2, "S1"), result("A", 10.0, "S2")
    ids = await pipeline.submit([r1, r2], chain="line1")
    assert ids == [r1.event.id, r2.event.id]  # the caller's items only, in order
    rows = stored(pipeline)
    # the failure opens the lot's hold episode (docs/quality.md): hold, lot status and the
    # notifications follow their cause, before the next result of the batch
    assert [t for t, _, _, _ in rows] == [
        "inspection.result", "nonconformance", "quality.hold", "lot.status", "notification",
        "notification", "inspection.result"]
    assert [s for _, s, _, _ in rows[:3]] == ["S1"] * 3 and rows[-1][1] == "S2"
    # the cause's ordering key (lot:{lot_id} by default) and lineage
    assert {k for _, _, k, _ in rows} == {"lot:A"}
    assert [c for _, _, _, c in rows[:-1]] == [r1.event.id] * 6


async def test_each_cause_gets_its_own_derived_events_and_one_hold_per_lot(
        pipeline: Pipeline) -> None:
    batch = [result("A", 10.2, "S1"), result("B", 10.0, "S2"), result("A", 9.0, "S3"),
             result("B", 11.0, "S4")]
    ids = await pipeline.submit(batch)
    assert ids == [s.event.id for s in batch]
    episode = ["quality.hold", "lot.status", "notification", "notification"]
    assert [(t, s if t in ("inspection.result", "nonconformance") else None)
            for t, s, _, _ in stored(pipeline)] == [
        ("inspection.result", "S1"), ("nonconformance", "S1"), *[(e, None) for e in episode],
        ("inspection.result", "S2"),
        ("inspection.result", "S3"), ("nonconformance", "S3"),  # lot A is held already
        ("inspection.result", "S4"), ("nonconformance", "S4"), *[(e, None) for e in episode]]


async def test_a_redelivered_cause_takes_its_derived_events_along(pipeline: Pipeline) -> None:
    first = result("A", 10.2, "S1", dedupe="hash-1")
    [first_id] = await pipeline.submit([first])
    # the redelivered copy (same key, flagged) maps to the first id; nothing new is stored,
    # also no second nonconformance (it has no key of its own any more)
    again = result("A", 10.2, "S1", dedupe="hash-1", redelivered=True)
    other = result("A", 9.0, "S2", dedupe="hash-2")
    ids = await pipeline.submit([again, other])
    assert ids == [first_id, other.event.id]
    assert [(t, s) for t, s, _, _ in stored(pipeline)
            if t in ("inspection.result", "nonconformance")] == [
        ("inspection.result", "S1"), ("nonconformance", "S1"),
        ("inspection.result", "S2"), ("nonconformance", "S2")]


async def test_a_repeated_failure_not_flagged_as_redelivery_is_a_new_part_event(
        pipeline: Pipeline) -> None:
    """Same payload sent twice on purpose (not a redelivery): two results, two
    nonconformances; the nonconformance has no key that could swallow the second."""
    await pipeline.submit([result("A", 10.2, "S1", dedupe="hash-1")])
    await pipeline.submit([result("A", 10.2, "S1", dedupe="hash-1")])
    types = [t for t, _, _, _ in stored(pipeline)]
    assert types.count("inspection.result") == 2 and types.count("nonconformance") == 2
    assert types.count("quality.hold") == 1
