"""The lots table: lot changes are written with the events that carry them, in one
transaction, and the outbox's cache follows only what was committed."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace

import pytest

from edge.errors import OutboxError
from edge.outbox import Outbox, lots, queries
from edge.quality.state import Decision, LotChange, QualityState
from tests.support import submission


def _with_change(sub, state: str | None = None, *, supplier: str | None = None):
    ev = sub.event
    change = LotChange(ev.data["lot_id"], time.time(), ev.type, ev.id, actor="cli:qa",
                       supplier=supplier,
                       decision=Decision(state, "J. Doe", "why") if state else None)
    return replace(sub, quality=(change,))


def _table(path: str, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_a_change_is_written_with_its_event_and_audited(erp_outbox: Outbox) -> None:
    sub = _with_change(submission("L1", type="lot.status", status="quarantine"), "quarantine",
                       supplier="acme")
    [eid] = await erp_outbox.submit([sub])
    [(state, episode, supplier, rev)] = _table(
        erp_outbox.path, "SELECT state, episode, supplier, rev FROM lots")
    assert (state, episode, supplier) == ("quarantine", 1, "acme")
    assert erp_outbox.quality.lots["L1"].rev == rev  # the cache took the committed row
    [(au_state, actor, event_id)] = _table(
        erp_outbox.path, "SELECT state, actor, event_id FROM audit WHERE state LIKE 'lot_%'")
    assert (au_state, actor, event_id) == ("lot_quarantine", "cli:qa", eid)


async def test_a_copy_that_is_not_stored_changes_nothing(erp_outbox: Outbox) -> None:
    first = _with_change(submission("L2", type="lot.status", status="hold"), "hold")
    await erp_outbox.submit([replace(first, dedupe_key="m1")])
    again = _with_change(submission("L2", type="lot.status", status="hold"), "hold")
    await erp_outbox.submit([replace(again, dedupe_key="m1")])  # matched: not stored
    [(episode, rev)] = _table(erp_outbox.path, "SELECT episode, rev FROM lots")
    assert episode == 1 and rev == erp_outbox.quality.lots["L2"].rev


async def test_a_failed_transaction_leaves_table_and_cache_as_they_were(
        erp_outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    await erp_outbox.submit([_with_change(submission("L3", type="lot.status"), "hold")])
    before = _table(erp_outbox.path, "SELECT * FROM lots")
    real = lots.apply_changes

    def failing(conn: sqlite3.Connection, changes, now=None):
        real(conn, changes, now)  # written, then the transaction fails
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(lots, "apply_changes", failing)
    with pytest.raises(OutboxError):
        await erp_outbox.submit([_with_change(submission("L3", type="lot.status"),
                                              "released")])
    assert _table(erp_outbox.path, "SELECT * FROM lots") == before
    assert erp_outbox.quality.lots["L3"].state == "hold"
    assert _table(erp_outbox.path, "SELECT COUNT(*) FROM events") == [(1,)]


async def test_the_cache_never_takes_an_older_row_over_a_newer_one() -> None:
    state = QualityState()
    row = lots.LotRow("L4", first_seen=1.0, updated_at=1.0, state="hold", rev=7)
    state.commit([row])
    state.commit([replace(row, state="released", rev=6)])
    assert state.lots["L4"].state == "hold"
    state.commit([replace(row, state="released", rev=8)])
    assert state.lots["L4"].state == "released"


async def test_lot_state_survives_a_reopen(erp_outbox: Outbox, tmp_path) -> None:
    await erp_outbox.submit([_with_change(submission("L5", type="lot.status"), "rejected")])
    await erp_outbox.close()
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as again:
        lot = again.quality.lots["L5"]
        assert (lot.state, lot.episode, lot.decided_by) == ("rejected", 1, "J. Doe")


async def test_released_lots_are_forgotten_after_their_retention(tmp_path) -> None:
    async with Outbox(tmp_path, router=lambda ev: ["erp"], lot_retention_days=1,
                      maintenance_interval_s=3600) as ob:
        await ob.submit([_with_change(submission("OLD", type="lot.status"), "released"),
                         _with_change(submission("HELD", type="lot.status"), "hold")])
        # the dedupe window (7 days) is the least retention: a forgotten lot starts again
        # at episode 1, whose keys must be gone by then
        assert ob.lot_retention_s == ob.config.dedupe_window_s
        later = time.time() + ob.lot_retention_s + 10
        assert await ob.prune_lots(now=later) == 1  # a held lot is never forgotten
        await ob.submit([_with_change(submission("NEW", type="lot.status"), "released")])
        assert await ob.prune_lots() == 0  # released, but within its retention
        assert set(ob.quality.lots) == {"HELD", "NEW"}
        assert {r[0] for r in _table(ob.path, "SELECT lot_id FROM lots")} == {"HELD", "NEW"}


async def test_the_cli_writes_lot_changes_with_its_events(tmp_path) -> None:
    """``insert_events`` outside the daemon (``queries.transaction``), as ``edge lot
    release`` does on a stopped gateway: the same rows and audit."""
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([_with_change(submission("L6", type="lot.status"), "hold")])
    conn = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    try:
        sub = _with_change(submission("L6", type="lot.status", status="released"), "released")
        with queries.transaction(conn):
            queries.insert_events(conn, [(sub, ["erp"], sub.event.to_json())],
                                  dedupe_window_s=3600)
        row = lots.get_lot(conn, "L6")
    finally:
        conn.close()
    assert row is not None and (row.state, row.episode) == ("released", 1)
    assert row.last is not None and set(row.last) == {"lot.status"}
