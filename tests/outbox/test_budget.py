"""Disk budget: alarm with forecast, expire oldest `low` only, then backpressure."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge.config import OutboxConfig
from edge.errors import OutboxFullError
from edge.outbox import Outbox
from tests.support import eventually, metric, sub

PAD = "x" * 600


def _count(path: str, sql: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


async def test_low_expired_and_counted_critical_kept_then_backpressure(tmp_path: Path):
    cfg = OutboxConfig(max_size_mb=1, alarm_at_percent=50, expire_at_percent=60)
    ob = Outbox(tmp_path, cfg, router=lambda ev: ["erp"], maintenance_interval_s=0.05)
    await ob.open()
    try:
        critical_ids: list[str] = []
        critical_ids += await ob.submit(
            [sub("quality.hold", lot_id=f"L{i}", reason=PAD) for i in range(100)])
        # telemetry flood past the expiry threshold
        for _ in range(30):
            try:
                await ob.submit([sub("machine.reading", pad=PAD) for _ in range(50)])
            except OutboxFullError:
                break
        await eventually(lambda: metric(ob.metrics.events_expired, "low") > 0, timeout=10)
        # keep adding protected events: low rows go first, then the outbox refuses
        with pytest.raises(OutboxFullError):
            for i in range(100_000):
                critical_ids += await ob.submit(
                    [sub("quality.hold", lot_id=f"M{i}", reason=PAD) for _ in range(20)])
                await asyncio.sleep(0.01)  # let maintenance run, as real time would
        assert metric(ob.metrics.outbox_backpressure) == 1
        assert not ob.accepting
        assert any(a["code"] == "outbox_budget" for a in ob.alarms)
    finally:
        await ob.close()
    # read after close: maintenance may expire or prune until then
    expired = metric(ob.metrics.events_expired, "low")
    assert expired > 0
    pruned = metric(ob.metrics.audit_pruned, "budget")
    db = str(tmp_path / "outbox.db")
    # every committed critical event is still there; only low rows were expired
    assert _count(db, "SELECT COUNT(*) FROM events WHERE class = 0") == len(critical_ids)
    # each expiry was audited; under pressure the oldest history of finished events may
    # have been pruned since, and that pruning is counted
    audited = _count(db, "SELECT COUNT(*) FROM audit WHERE state = 'expired'")
    assert audited <= expired <= audited + pruned
    assert _count(db, "SELECT COUNT(*) FROM audit WHERE state = 'expired' AND event_id IN "
                      "(SELECT id FROM events)") == 0


async def test_accepting_again_after_space_is_freed(tmp_path: Path):
    from edge.outbox import Resolution

    cfg = OutboxConfig(max_size_mb=0.5, alarm_at_percent=50, expire_at_percent=60)
    ob = Outbox(tmp_path, cfg, router=lambda ev: ["erp"], maintenance_interval_s=0.05)
    await ob.open()
    try:
        with pytest.raises(OutboxFullError):
            for i in range(10_000):
                await ob.submit([sub("quality.hold", lot_id=f"L{i}", reason=PAD)
                                 for _ in range(20)])
                await asyncio.sleep(0.01)  # let maintenance run, as real time would
        waiter = asyncio.create_task(ob.wait_accepting())
        await asyncio.sleep(0.2)  # a window in which the outbox must keep refusing
        assert not waiter.done()
        # deliver everything: rows leave, pages are freed, intake resumes
        while batch := await ob.lease("erp", 500):
            await ob.complete("erp", [Resolution(e.seq, e.id, "delivered", 200) for e in batch])
        await asyncio.wait_for(waiter, 10)
        assert ob.accepting
        await ob.submit([sub("quality.hold", lot_id="again", reason="ok")])
    finally:
        await ob.close()


async def test_the_wal_is_checkpointed_well_before_it_could_fill_a_small_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Found by the long disk-full campaign: on a 16 MB file system with the default
    budget, the WAL (checkpointed at 64 MB) grew into all free space and no checkpoint
    could fold it back once the disk was full. It is now checkpointed and truncated at a
    quarter of the free space the outbox finds at start."""
    import edge.outbox.store as store

    monkeypatch.setattr(store, "_free_bytes", lambda path: 8 << 20)
    ob = Outbox(tmp_path, router=lambda ev: ["erp"])  # default budget: 64 MB WAL limit
    await ob.open()
    wal = tmp_path / "outbox.db-wal"
    try:
        for _ in range(6):
            await ob.submit([sub() for _ in range(1000)])
        written = _count(ob.path, "SELECT COUNT(*) FROM events")
        assert written == 6000
        # checkpointed at a quarter of 8 MB (one commit may overshoot it); 7.5 MB before
        assert wal.stat().st_size <= 4 << 20, wal.stat().st_size
    finally:
        await ob.close()
