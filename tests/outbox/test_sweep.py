"""Deferred delete: a delivered row is marked done and swept later, in seq order.

What a user relies on: a delivered event is never sent again (also after a crash before
the sweep), never counted as queued, never expired or audited as anything but delivered,
and its key's later events flow past it; the sweep removes the row and the event; an
outbox file of the previous schema upgrades with every queued row intact.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from edge.outbox import Outbox, Resolution, queries
from edge.outbox.schema import SCHEMA_VERSION
from tests.support import sub


def _count(path: str, sql: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def _deliver(ob: Outbox, n: int) -> list[str]:
    leased = await ob.lease("erp", n)
    await ob.complete("erp", [Resolution(e.seq, e.id, "delivered", status=200) for e in leased])
    return [e.id for e in leased]


async def test_delivered_rows_wait_for_the_sweep_and_are_never_sent_again(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        ids = await ob.submit([sub(key="lot:A", n=i) for i in range(4)])
        assert await _deliver(ob, 2) == ids[:2]
        # marked, not deleted: the rows and events are still in the file ...
        assert _count(ob.path, "SELECT COUNT(*) FROM deliveries WHERE done = 1") == 2
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 4
        # ... but gone for everything that reads the queue
        stats = await ob.stats()
        assert stats["sinks"]["erp"]["total"] == 2
        # the key's next events follow at once (the done rows do not hold the lot)
        nxt = await ob.lease("erp", 10)
        assert [e.id for e in nxt] == ids[2:]
        ob.release("erp", [e.seq for e in nxt])
    # a crash (or stop) before the sweep: the marks survive, nothing is sent twice
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        assert [e.id for e in await ob.lease("erp", 10)] == ids[2:]
        assert await ob.sweep() == 2
        assert _count(ob.path, "SELECT COUNT(*) FROM deliveries") == 2
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 2
        assert _count(ob.path, "SELECT COUNT(*) FROM audit WHERE state = 'delivered'") == 2


async def test_an_event_with_one_sink_delivered_stays_until_the_other_is(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp", "qms"],
                      maintenance_interval_s=3600) as ob:
        [eid] = await ob.submit([sub(key="lot:A")])
        await _deliver(ob, 1)
        await ob.sweep()
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 1  # qms still waits
        [row] = await ob.lease("qms", 10)
        assert row.id == eid and row.body
        await ob.complete("qms", [Resolution(row.seq, row.id, "delivered", status=200)])
        await ob.sweep()
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 0


async def test_expiry_never_touches_a_delivered_low_event(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        await ob.submit([sub("machine.reading", n=i) for i in range(3)])
        await _deliver(ob, 3)
        assert await ob.expire_low(1 << 30) == 0
        assert _count(ob.path, "SELECT COUNT(*) FROM audit WHERE state = 'expired'") == 0


async def test_the_sweep_runs_by_itself_after_enough_deliveries(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(queries, "SWEEP_ROWS", 10)
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        await ob.submit([sub(key=f"lot:{i % 3}", n=i) for i in range(25)])
        for _ in range(3):
            await _deliver(ob, 10)
        if ob._sweeping is not None:
            await ob._sweeping
        assert _count(ob.path, "SELECT COUNT(*) FROM events") <= 25 - 10
        assert _count(ob.path, "SELECT COUNT(*) FROM deliveries WHERE done = 0") == 0


async def test_operator_changes_see_only_rows_still_to_deliver(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["old"], maintenance_interval_s=3600) as ob:
        ids = await ob.submit([sub(key="lot:A", n=i) for i in range(3)])
        leased = await ob.lease("old", 1)
        await ob.complete("old", [Resolution(leased[0].seq, leased[0].id, "delivered", 200)])
        moved = await ob._write(lambda c: queries.reroute_sink(
            c, from_sink="old", to_sink="erp", actor="op", reason="renamed"))
        assert moved == 2  # the delivered one is not sent to the new sink
        assert [e.id for e in await ob.lease("erp", 10)] == ids[1:]


def _downgrade_to_4(path: Path) -> None:
    """The file as the previous schema wrote it: no ``done``, a full ready index."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP INDEX deliveries_done")
        conn.execute("DROP INDEX deliveries_ready")
        conn.execute("ALTER TABLE deliveries DROP COLUMN done")
        conn.execute("CREATE INDEX deliveries_ready ON deliveries(sink, class, seq)")
        conn.execute("CREATE INDEX audit_key ON audit(ordering_key) "
                     "WHERE ordering_key IS NOT NULL")
        conn.execute("PRAGMA user_version=4")
        conn.commit()
    finally:
        conn.close()


async def test_a_file_of_schema_4_upgrades_with_its_queue_intact(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        ids = await ob.submit([sub(key="lot:A", n=i) for i in range(3)])
    _downgrade_to_4(tmp_path / "outbox.db")
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        assert _count(ob.path, "PRAGMA user_version") == SCHEMA_VERSION
        assert [e.id for e in await ob.lease("erp", 10)] == ids
        ready_sql = _count_sql(ob.path)
        assert "done = 0" in ready_sql
        assert _count(ob.path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_key'") == 0


def _count_sql(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT sql FROM sqlite_master WHERE name = "
                                "'deliveries_ready'").fetchone()[0])
    finally:
        conn.close()


async def test_the_low_water_sweep_passes_a_dead_letter_far_behind(tmp_path: Path,
                                                                   monkeypatch):
    """A dead letter keeps its event; the sweep of the events after it still advances."""
    monkeypatch.setattr(queries, "SWEEP_EVENTS", 5)
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        ids = await ob.submit([sub(key=f"lot:{i}", n=i) for i in range(30)])
        leased = await ob.lease("erp", 30, park=False)
        await ob.complete("erp", [Resolution(leased[0].seq, ids[0], "dead_letter", status=422,
                                             reason="bad")]
                          + [Resolution(e.seq, e.id, "delivered", 200) for e in leased[1:]])
        for _ in range(10):
            await ob._write(lambda c: queries.sweep_delivered(c, events_limit=5))
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 1  # the dead letter's


async def test_events_behind_a_row_that_waits_leave_with_the_rolling_sweep(tmp_path: Path):
    """An old row waiting for a retry holds the low-water mark back; the events delivered
    after it still leave the file, by the rolling window of the maintenance loop."""
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        ids = await ob.submit([sub(key=f"lot:{i}", n=i) for i in range(10)])
        leased = await ob.lease("erp", 10)
        await ob.complete("erp", [Resolution(leased[0].seq, ids[0], "retry", status=503,
                                             next_at=time.time() + 600)]
                          + [Resolution(e.seq, e.id, "delivered", 200) for e in leased[1:]])
        await ob._write(queries.sweep_delivered)
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 10  # the mark did not move
        await ob._sweep_orphan_window()
        assert _count(ob.path, "SELECT COUNT(*) FROM events") == 1  # the one still queued
        assert [e.id for e in await ob.lease("erp", 10)] == []  # it still waits
