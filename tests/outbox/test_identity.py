"""Row identities are never reused, expiry never takes a row in flight, a late completion
touches only its own rows, a retry is never early (DESIGN invariant 2, items 6 and 9 of
"keep every promise")."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge.outbox import Outbox, Resolution, queries
from tests.support import eventually, sub


@pytest.fixture
def outbox(erp_outbox: Outbox) -> Outbox:
    return erp_outbox


async def _seq_of(outbox: Outbox, event_id: str) -> int:
    row = await outbox.read(lambda c: c.execute("SELECT seq FROM events WHERE id = ?",
                                                (event_id,)).fetchone())
    return int(row[0])


async def test_a_delivered_events_seq_is_never_given_to_a_new_event(outbox: Outbox):
    [first] = await outbox.submit([sub(key="lot:A")])
    [leased] = await outbox.lease("erp", 10)
    await outbox.complete("erp", [Resolution(leased.seq, leased.id, "delivered", 201)])
    [second] = await outbox.submit([sub(key="lot:A")])
    assert await _seq_of(outbox, second) > leased.seq


async def test_expiry_never_takes_a_row_in_flight(outbox: Outbox):
    """Rows leased while the expiry waits for the writer are in flight when it runs: an
    older build decided on a snapshot taken before waiting and expired them."""
    ids = await outbox.submit([sub("machine.reading") for _ in range(5)])
    gate, writing = threading.Event(), threading.Event()

    def hold_the_writer(conn: sqlite3.Connection) -> None:
        writing.set()
        gate.wait(10)

    busy = asyncio.create_task(outbox._write(hold_the_writer))  # the writer is busy
    await eventually(writing.is_set, what="the busy write to start")
    queued = outbox._writer.queued
    expiry = asyncio.create_task(outbox.expire_low(10 << 20))
    await eventually(lambda: outbox._writer.queued > queued,
                     what="the expiry to queue behind the busy write")
    leased = await outbox.lease("erp", 2)  # the reader is free: two rows go in flight
    gate.set()
    await busy
    assert await expiry == 3  # only the three not in flight
    await outbox.complete("erp", [Resolution(r.seq, r.id, "delivered", 200) for r in leased])
    delivered = await outbox.read(lambda c: [r[0] for r in c.execute(
        "SELECT event_id FROM audit WHERE state = 'delivered' ORDER BY seq")])
    expired = await outbox.read(lambda c: [r[0] for r in c.execute(
        "SELECT event_id FROM audit WHERE state = 'expired' ORDER BY seq")])
    assert delivered == [r.id for r in leased]
    assert sorted(expired) == sorted(set(ids) - set(delivered))


async def test_a_late_completion_cannot_delete_another_events_row(outbox: Outbox, tmp_path):
    """The reproduction: a leased low row is removed beside the lease (expiry in an older
    build, ``edge outbox discard`` from the CLI here), a hold is stored next, then the
    lease completes. With a reused seq the completion deleted the hold's row and the hold
    vanished with only its ``stored`` audit row."""
    await outbox.submit([sub("machine.reading")])
    [leased] = await outbox.lease("erp", 10)
    cli = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    with queries.transaction(cli):
        queries.discard_sink(cli, sink="erp", actor="op", reason="sink removed")
    cli.close()
    [hold] = await outbox.submit([sub("quality.hold", lot_id="L1", reason="out of spec")])
    await outbox.complete("erp", [Resolution(leased.seq, leased.id, "delivered", 200)])
    assert [e.id for e in await outbox.lease("erp", 10)] == [hold]
    states = await outbox.read(lambda c: [r[0] for r in c.execute(
        "SELECT state FROM audit WHERE event_id = ? ORDER BY seq", (leased.id,))])
    assert states == ["stored", "discarded"]  # no 'delivered' for a row that was gone


async def test_dead_letter_ids_are_never_reused(outbox: Outbox):
    await outbox.submit([sub(key="lot:A")])
    [a] = await outbox.lease("erp", 10)
    await outbox.complete("erp", [Resolution(a.seq, a.id, "dead_letter", 422, "bad")])
    [first] = await outbox.read(queries.dlq_list)
    await outbox.dlq_discard(ids=[first["id"]], actor="op", reason="entered by hand")
    await outbox.submit([sub(key="lot:B")])
    [b] = await outbox.lease("erp", 10)
    await outbox.complete("erp", [Resolution(b.seq, b.id, "dead_letter", 422, "bad")])
    [second] = await outbox.read(queries.dlq_list)
    assert second["id"] > first["id"]


async def test_a_retry_whose_backoff_was_not_saved_is_still_not_early(outbox: Outbox):
    """Recording the outcome fails (storage hiccup): the row stays queued as it was, but
    a new lease must not resend it before the backoff the outcome asked for."""
    await outbox.submit([sub(key="lot:A"), sub(key="lot:A")])
    [row, _] = await outbox.lease("erp", 10)
    await outbox.complete("erp", [Resolution(_.seq, _.id, "retry", attempted=False)])
    backoff_until = time.time() + 30

    async def failing_write(fn, rows=1):
        raise sqlite3.OperationalError("disk I/O error")

    real_write = outbox._write
    outbox._write = failing_write  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        await outbox.complete("erp", [Resolution(row.seq, row.id, "retry", 503, "HTTP 503",
                                                 next_at=backoff_until)])
    outbox._write = real_write  # type: ignore[method-assign]
    assert await outbox.lease("erp", 10) == []  # neither the row nor its key's next one


async def test_an_outbox_of_schema_2_keeps_its_rows_and_never_reuses_identities(
        tmp_path: Path):
    conn = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    conn.executescript(SCHEMA_2)
    conn.execute("INSERT INTO events VALUES (7, 'e7', 'inspection.result', 1, 'lot:A', 's', "
                 "0, '', '{}')")
    conn.execute("INSERT INTO dead_letters VALUES (4, 7, 'erp', 'e7', 'inspection.result', 1,"
                 " 'lot:A', 422, 'bad', NULL, 1, 0)")
    conn.execute("INSERT INTO dedupe VALUES ('s', 'msg-1', 'e7', ?)", (time.time(),))
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        [dl] = await ob.read(queries.dlq_list)
        assert (dl["id"], dl["event_id"]) == (4, "e7")
        await ob.dlq_discard(ids=[4], actor="op", reason="test")
        [new] = await ob.submit([sub(key="lot:B")])
        assert await _seq_of(ob, new) == 8
        [leased] = await ob.lease("erp", 10)
        await ob.complete("erp", [Resolution(leased.seq, leased.id, "dead_letter", 422, "x")])
        [dl] = await ob.read(queries.dlq_list)
        assert dl["id"] == 5
        # a stored identity key still matches within its window
        again = sub(key="lot:C", source="s")
        again.dedupe_key = "msg-1"
        assert await ob.submit([again]) == ["e7"]


SCHEMA_2 = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE events(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
  class INTEGER NOT NULL, ordering_key TEXT, source TEXT NOT NULL, received_at REAL NOT NULL,
  sha256 TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE deliveries(seq INTEGER NOT NULL, sink TEXT NOT NULL, class INTEGER NOT NULL,
  ordering_key TEXT, next_at REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT, PRIMARY KEY(seq, sink)) WITHOUT ROWID;
CREATE TABLE dead_letters(id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, sink TEXT NOT NULL,
  event_id TEXT NOT NULL, type TEXT NOT NULL, class INTEGER NOT NULL, ordering_key TEXT,
  status INTEGER, reason TEXT NOT NULL, response_body TEXT, attempts INTEGER NOT NULL,
  dead_at REAL NOT NULL);
CREATE INDEX dead_letters_seq ON dead_letters(seq);
CREATE INDEX dead_letters_event ON dead_letters(event_id);
CREATE TABLE dedupe(source TEXT NOT NULL, key TEXT NOT NULL, event_id TEXT NOT NULL,
  created_at REAL NOT NULL, PRIMARY KEY(source, key));
"""
