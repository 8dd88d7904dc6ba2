"""Hold episodes through the real pipeline and outbox: a lot's first failure opens one,
further failures add nonconformances, only a release ends it, the next failure opens the
next, and every change of the lot is in the same transaction as its events."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from edge.errors import OutboxError
from edge.outbox import queries
from edge.pipeline import AlreadyReleased, UnknownLot
from edge.rules import SpecLimitsRule
from tests.quality.support import (
    audit_rows,
    failing,
    receipt,
    result,
    rules_keys,
    status,
    stored,
    types_of,
)

EPISODE = ["quality.hold", "lot.status", "supplier.case", "notification", "notification"]


async def test_the_first_failure_opens_an_episode_with_one_of_each(line) -> None:
    await line.submit(receipt("L1", supplier="acme", material="BRG-6204"))
    [rid] = await line.submit(failing("L1", "S1"))
    docs = stored(line.path)
    assert types_of(docs) == ["material.receipt", "inspection.result", "nonconformance",
                              *EPISODE]
    by_type = {d["type"]: d for d in docs}
    hold, case = by_type["quality.hold"]["data"], by_type["supplier.case"]["data"]
    assert hold["episode"] == 1 and hold["inspection_event_id"] == rid
    assert by_type["lot.status"]["data"]["status"] == "hold"
    # the supplier came from the receipt, remembered in the lots table
    assert (case["supplier"], case["material"]) == ("acme", "BRG-6204")
    assert {d["data"]["audience"] for d in docs if d["type"] == "notification"} == {
        "procurement", "planning"}
    # derived: the cause's ordering key and correlation id
    assert {d["ordering_key"] for d in docs[1:]} == {"lot:L1"}
    assert {d["correlation_id"] for d in docs[1:]} == {rid}
    assert set(rules_keys(line.path)) == {
        "hold:L1:1", "lot-status:L1:1:hold", "supplier-case:L1:1", "notify:L1:1:procurement",
        "notify:L1:1:planning"}
    lot = line.lot("L1")
    assert (lot.state, lot.episode, lot.supplier, lot.failures) == ("hold", 1, "acme", 1)
    [held] = audit_rows(line.path)
    assert (held["state"], held["event_id"], held["detail"]["from"]) == (
        "lot_hold", rid, "unknown")


async def test_further_failures_during_the_episode_add_nonconformances_only(line) -> None:
    await line.submit(failing("L1", "S1"), failing("L1", "S2"))  # one batch
    await line.submit(result("L1", 10.0, "S3"))  # a passing part changes nothing
    await line.submit(result("L1", 10.0, "S4", result="fail"))  # the station says fail
    types = types_of(stored(line.path))
    assert types.count("nonconformance") == 3
    assert types.count("quality.hold") == types.count("lot.status") == 1
    assert "supplier.case" not in types  # no supplier known for this lot
    assert (line.lot("L1").episode, line.lot("L1").failures) == (1, 3)


async def test_only_a_release_ends_the_episode_and_the_next_failure_opens_the_next(
        line) -> None:
    await line.submit(receipt("L1"), failing("L1", "S1"))
    done = await line.pipeline.release("L1", by="J. Doe", reason="sorted 100 %",
                                       actor="cli:qa by J. Doe")
    assert (done.episode, done.previous_state, len(done.event_ids)) == (1, "hold", 2)
    assert line.lot("L1").state == "released"
    released = stored(line.path, "lot.status", "quality.release")[-2:]
    assert [(d["type"], d["data"].get("status")) for d in released] == [
        ("lot.status", "released"), ("quality.release", None)]
    assert {d["data"]["decided_by"] for d in released} == {"J. Doe"}
    with pytest.raises(AlreadyReleased):
        await line.pipeline.release("L1", by="x", reason="again", actor="cli")
    with pytest.raises(UnknownLot):
        await line.pipeline.release("NOPE", by="x", reason="y", actor="cli")

    await line.submit(failing("L1", "S9"))  # after the release: episode 2
    holds = stored(line.path, "quality.hold")
    assert [h["data"]["episode"] for h in holds] == [1, 2]
    assert len(stored(line.path, "supplier.case")) == 2  # one per episode
    assert "hold:L1:2" in rules_keys(line.path)
    assert (line.lot("L1").state, line.lot("L1").episode) == ("hold", 2)
    assert [(a["state"], a["actor"]) for a in audit_rows(line.path)] == [
        ("lot_hold", "gateway"), ("lot_released", "cli:qa by J. Doe"), ("lot_hold", "gateway")]


async def test_decisions_from_sources_update_the_state(line) -> None:
    await line.submit(receipt("L2"), status("L2", "quarantine", by="qms"))
    assert (line.lot("L2").state, line.lot("L2").episode) == ("quarantine", 1)
    await line.submit(failing("L2", "S1"))  # blocked: a nonconformance, no new episode
    assert stored(line.path, "quality.hold") == []
    await line.submit(status("L2", "rejected", by="mrb"))
    assert (line.lot("L2").state, line.lot("L2").episode) == ("rejected", 1)
    await line.submit(status("L2", "", type_="quality.release", by="erp"))
    assert (line.lot("L2").state, line.lot("L2").decided_by) == ("released", "erp")
    await line.submit(failing("L2", "S2"))
    assert [h["data"]["episode"] for h in stored(line.path, "quality.hold")] == [2]
    await line.submit(status("L2", "released"))
    assert line.lot("L2").state == "released"


async def test_the_supplier_of_the_result_serves_when_there_is_no_receipt(line) -> None:
    await line.submit(failing("L3", "S1", supplier="bolts-inc"))
    [case] = stored(line.path, "supplier.case")
    assert case["data"]["supplier"] == "bolts-inc"
    await line.submit(failing("L4", "S1"))  # no supplier known: no supplier case
    assert len(stored(line.path, "supplier.case")) == 1


async def test_two_concurrent_failing_submissions_of_one_lot_store_one_hold(line) -> None:
    """Both calls see "no episode" (the cache changes only after a commit): they derive
    the same keys, and the outbox stores one hold, one status, one of each notification."""
    ids = await asyncio.gather(line.submit(failing("L5", "S1"), chain="station1"),
                               line.submit(failing("L5", "S2"), chain="station2"))
    assert all(ids)
    types = types_of(stored(line.path))
    assert types.count("inspection.result") == types.count("nonconformance") == 2
    assert types.count("quality.hold") == types.count("lot.status") == 1
    assert types.count("notification") == 2
    assert (line.lot("L5").episode, line.lot("L5").failures) == (1, 2)


async def test_a_refused_write_changes_nothing(line, monkeypatch) -> None:
    real = queries.insert_event_batches

    def broken(conn: sqlite3.Connection, payloads: list) -> list:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(queries, "insert_event_batches", broken)
    with pytest.raises(OutboxError):
        await line.submit(failing("L6", "S1"))
    assert line.lot("L6") is None  # the cache took nothing
    monkeypatch.setattr(queries, "insert_event_batches", real)
    await line.submit(failing("L6", "S1"))  # the source's retry
    assert [h["data"]["episode"] for h in stored(line.path, "quality.hold")] == [1]
    assert line.lot("L6").episode == 1


async def test_a_redelivered_failure_changes_the_lot_once(line) -> None:
    await line.submit(failing("L7", "S1", dedupe="m1"))
    await line.submit(failing("L7", "S1", dedupe="m1", redelivered=True))
    assert types_of(stored(line.path)).count("nonconformance") == 1
    assert line.lot("L7").failures == 1


async def test_a_failure_stored_right_after_a_release_gets_its_own_episode(line) -> None:
    """The rules derived a failure while the lot was on hold (nonconformance only); a
    release committed before it. The failure is kept as pending on the lot, and the
    catch-up opens episode 2 for it — also after a restart in between."""
    await line.submit(failing("L8", "S1"))
    batch, _ = line.pipeline.rules.derive([failing("L8", "S2")], line.outbox.quality)
    assert types_of([s.event.to_wire() for s in batch]) == ["inspection.result",
                                                            "nonconformance"]
    await line.pipeline.release("L8", by="J. Doe", reason="ok", actor="cli")
    await line.outbox.submit(batch)
    assert line.lot("L8").pending is not None and line.lot("L8").state == "released"
    await line.restart()  # the pending failure survives in the lots table
    assert await line.pipeline.catch_up() == len(["quality.hold", "lot.status",
                                                  "notification", "notification"])
    lot = line.lot("L8")
    assert (lot.state, lot.episode, lot.pending) == ("hold", 2, None)
    second = stored(line.path, "quality.hold")[-1]
    assert second["data"]["inspection_event_id"] == batch[0].event.id
    assert second["correlation_id"] == batch[0].event.correlation_id
    assert await line.pipeline.catch_up() == 0  # nothing owed any more
    assert [a["state"] for a in audit_rows(line.path)] == [
        "lot_hold", "lot_released", "lot_pending", "lot_hold"]


async def test_rules_with_hold_false_add_nonconformances_without_an_episode(lines) -> None:
    ln = await lines(SpecLimitsRule(type="spec_limits", upper=10.05, hold=False))
    await ln.submit(failing("L9", "S1"))
    assert types_of(stored(ln.path)) == ["inspection.result", "nonconformance"]
    assert ln.lot("L9").state == "unknown"


async def test_what_an_episode_emits_matches_the_catalogue_and_the_sample_contracts(
        line) -> None:
    """The event catalogue's models, and the sample ERP / QMS schemas of
    config/plant.example.yaml (a body that breaks them is dead-lettered, never sent)."""
    from pathlib import Path

    from edge.events.catalogue import validate_data
    from edge.sinks.http.contract import load_schema

    await line.submit(receipt("L10"), failing("L10", "S1"))
    await line.pipeline.release("L10", by="J. Doe", reason="sorted", actor="cli")
    docs = stored(line.path)
    for doc in docs:
        validate_data(doc["type"], doc["data"])  # raises InputError naming the field
    schemas = Path(__file__).resolve().parents[2] / "config" / "schemas"
    for name, type_ in [("erp-lot-status.json", "lot.status"),
                        ("qms-nonconformance.json", "nonconformance")]:
        contract = load_schema(schemas / name)
        checked = [contract.violation(d) for d in docs if d["type"] == type_]
        assert checked and checked == [None] * len(checked), name


async def test_a_stream_of_sightings_writes_each_lot_once_per_call(line) -> None:
    """Passing results change nothing the rules read: each lot's row is written once per
    call, with its last event; the caller's submissions are left as they were."""
    from edge.outbox import lots

    items = [result(f"L{i % 2}", 10.0, f"S{i}") for i in range(10)]
    batch, _ = line.pipeline.rules.derive(items, line.outbox.quality)
    assert [len(s.quality) for s in batch] == [0] * 8 + [1, 1]
    assert all(not s.quality for s in items)  # a source may submit them again
    await line.submit(*items)
    conn = sqlite3.connect(line.path)
    try:
        rows = {lot: lots.get_lot(conn, lot) for lot in ("L0", "L1")}
    finally:
        conn.close()
    assert rows["L0"].last_event_id == items[8].event.id
    assert rows["L1"].last_event_id == items[9].event.id
    assert set(rows["L1"].last) == {"inspection.result"} and rows["L1"].state == "unknown"


async def test_a_release_from_a_source_ends_the_episode_with_a_quality_release(line) -> None:
    """A lot.status released from the MES or a QMS downlink is followed by a quality.release
    (the record the line's retained hold topic is cleared with); a sighting of an already
    released lot and a hold decision derive none."""
    await line.submit(receipt("L3"), failing("L3", "S1"))
    await line.submit(status("L3", "released", by="mes", reason="sorted"))
    releases = stored(line.path, "quality.release")
    assert [(r["data"]["decided_by"], r["data"]["reason"], r["data"]["episode"])
            for r in releases] == [("mes", "sorted", 1)]
    [cause] = [e for e in stored(line.path, "lot.status")
               if e["data"]["status"] == "released"]
    assert releases[0]["data"]["lot_status_event_id"] == cause["id"]
    assert releases[0]["ordering_key"] == cause["ordering_key"]  # after it, same lot
    await line.submit(status("L3", "released", by="mes"))  # already released: nothing more
    await line.submit(status("L3", "hold", by="qms"))
    assert len(stored(line.path, "quality.release")) == 1
