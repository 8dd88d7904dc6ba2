"""Lease scan: priority classes, per-key FIFO with keys in parallel, live-first share."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge.outbox import Outbox, Resolution
from tests.support import sub


@pytest.fixture
async def outbox(tmp_path: Path):
    ob = Outbox(tmp_path, router=lambda ev: ["erp"])
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()


async def test_higher_classes_go_first(outbox: Outbox):
    low = await outbox.submit([sub("machine.reading") for _ in range(3)])
    normal = await outbox.submit([sub("production.count", count=1)])
    critical = await outbox.submit([sub("quality.hold", lot_id="A", reason="x")])
    got = await outbox.lease("erp", 2)
    # the batch is returned in seq order; the selection is by class
    assert {e.id for e in got} == {critical[0], normal[0]}
    assert low[0] not in {e.id for e in got}


async def test_a_later_critical_event_pulls_its_keys_earlier_events_forward(outbox: Outbox):
    """Per-key order beats priority: a hold for lot A is not sent before A's earlier result."""
    [result_a] = await outbox.submit([sub(key="lot:A", cls="normal")])
    others = await outbox.submit([sub(key=f"lot:X{i}", cls="normal") for i in range(5)])
    [hold_a] = await outbox.submit([sub("quality.hold", key="lot:A", lot_id="A", reason="x")])
    got = await outbox.lease("erp", 2)
    assert [e.id for e in got] == [result_a, hold_a]
    assert not set(others) & {e.id for e in got}


async def test_key_blocked_by_in_flight_head_while_other_keys_flow(outbox: Outbox):
    a = await outbox.submit([sub(key="lot:A") for _ in range(3)])
    first = await outbox.lease("erp", 1)
    assert [e.id for e in first] == [a[0]]
    b = await outbox.submit([sub(key="lot:B") for _ in range(2)])
    got = await outbox.lease("erp", 10)
    assert [e.id for e in got] == b  # A's later events wait for A's head


async def test_key_blocked_while_its_head_waits_for_retry(outbox: Outbox):
    a = await outbox.submit([sub(key="lot:A") for _ in range(2)])
    b = await outbox.submit([sub(key="lot:B")])
    [head] = await outbox.lease("erp", 1)
    await outbox.complete("erp", [Resolution(head.seq, head.id, "retry", 503, "HTTP 503",
                                             next_at=time.time() + 60)])
    assert [e.id for e in await outbox.lease("erp", 10)] == b
    assert a[1] not in {e.id for e in await outbox.lease("erp", 10)}


async def test_chain_of_one_key_can_fill_a_lease_in_order(outbox: Outbox):
    a = await outbox.submit([sub(key="lot:A") for _ in range(20)])
    got = await outbox.lease("erp", 8)
    assert [e.id for e in got] == a[:8]
    got2 = await outbox.lease("erp", 100)
    assert got2 == []  # the rest waits for the first 8 (in flight)


async def test_live_share_interleaves_fresh_events_into_a_backlog(outbox: Outbox):
    backlog = await outbox.submit([sub("machine.reading") for _ in range(200)])
    fresh = await outbox.submit([sub("machine.reading") for _ in range(5)])
    got = {e.id for e in await outbox.lease("erp", 50, live_limit=10)}
    assert set(fresh) <= got
    assert len(got) == 50
    assert set(backlog[:40]) <= got  # the rest of the lease is the oldest


async def test_events_without_key_are_independent(outbox: Outbox):
    ids = await outbox.submit([sub("machine.reading") for _ in range(5)])
    [first] = await outbox.lease("erp", 1)
    await outbox.complete("erp", [Resolution(first.seq, first.id, "retry", 503, "x",
                                             next_at=time.time() + 60)])
    assert [e.id for e in await outbox.lease("erp", 10)] == ids[1:]


async def test_a_dead_letter_committed_during_the_scan_still_holds_its_key(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch):
    """Found by the fault campaign (2 order violations in 500 kill -9 cycles): another
    lane's answer committed the head's dead letter between the scan's statements; the scan
    saw no parked key yet and no head row any more, and leased the key's next event."""
    import edge.outbox.lease as lease
    from edge.outbox.dbthread import connect
    from edge.outbox.queries import apply_resolutions

    a = await outbox.submit([sub(key="lot:A") for _ in range(2)])
    [head] = await outbox.lease("erp", 1)  # in flight in "another lane"
    parked_key_set = lease.parked_key_set

    def parked_then_the_answer_commits(conn, sink):  # type: ignore[no-untyped-def]
        keys = parked_key_set(conn, sink)
        other = connect(outbox.path)
        other.execute("BEGIN IMMEDIATE")
        apply_resolutions(other, "erp", [Resolution(head.seq, head.id, "dead_letter", 422,
                                                    "HTTP 422", ordering_key="lot:A")])
        other.execute("COMMIT")
        other.close()
        return keys

    monkeypatch.setattr(lease, "parked_key_set", parked_then_the_answer_commits)
    got = await outbox.lease("erp", 10)
    assert a[1] not in {e.id for e in got}
    monkeypatch.undo()
    outbox.release("erp", [head.seq])  # the lane records its answer
    assert a[1] not in {e.id for e in await outbox.lease("erp", 10)}  # parked now


async def test_rows_waiting_for_a_retry_do_not_use_up_the_scan(outbox: Outbox):
    """A retry storm (thousands of rows waiting) must not hide the rows that are due: the
    scan's budget counts only rows it could send."""
    from edge.outbox.lease import scan_lease

    waiting = await outbox.submit([sub("machine.reading", n=i) for i in range(30)])
    [due] = await outbox.submit([sub("machine.reading", n=99)])
    leased = await outbox.lease("erp", 30)
    later = time.time() + 600
    await outbox.complete("erp", [Resolution(e.seq, e.id, "retry", status=503, next_at=later)
                                  for e in leased if e.id in waiting])
    rows = await outbox.read(lambda c: scan_lease(c, "erp", 5, now=time.time(), max_scan=10))
    assert [r.event_id for r in rows] == [due]
