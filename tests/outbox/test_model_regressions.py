"""What the model-based tests found, each kept as a plain test of its shrunk example.

The forwarder model (``test_model_forwarder.py``) drives an operator's
``edge outbox reroute`` with the gateway stopped, as the CLI does: ``queries.reroute_sink``
in one transaction on the outbox file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.components import Submission
from edge.events import make_event
from edge.outbox import Outbox, Resolution, queries


def _event(lot: str) -> Submission:
    return Submission(make_event(type="inspection.result", site="s", source="line1",
                                 data={"lot": lot, "result": "fail"}, ordering_key=f"lot:{lot}"))


def _reroute(outbox: Outbox, frm: str, to: str) -> int:
    conn = sqlite3.connect(outbox.path, isolation_level=None)
    try:
        with queries.transaction(conn):
            return queries.reroute_sink(conn, from_sink=frm, to_sink=to, actor="op",
                                        reason="sink replaced")
    finally:
        conn.close()


def _state(outbox_path: str) -> tuple[set[tuple[int, str]], set[tuple[int, str]], list[str]]:
    conn = sqlite3.connect(outbox_path)
    try:
        queued = set(conn.execute("SELECT seq, sink FROM deliveries"))
        dead = set(conn.execute("SELECT seq, sink FROM dead_letters"))
        audit = [r[0] for r in conn.execute("SELECT state FROM audit ORDER BY seq")]
    finally:
        conn.close()
    return queued, dead, audit


async def test_rerouting_a_sink_to_itself_keeps_its_rows(tmp_path: Path) -> None:
    """Found as: a message stored for erp, then ``reroute --from erp --to erp``. The copy
    was a no-op and the delete that follows it dropped every queued row of erp, each
    audited as "rerouted": the events were gone without being delivered."""
    outbox = Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600)
    await outbox.open()
    await outbox.submit([_event("A"), _event("B")])
    await outbox.close()

    assert _reroute(outbox, "erp", "erp") == 0

    queued, _, audit = _state(outbox.path)
    assert queued == {(1, "erp"), (2, "erp")}
    assert "rerouted" not in audit


async def test_rerouting_onto_a_dead_letter_does_not_queue_the_event_twice(
        tmp_path: Path) -> None:
    """Found as: an event for erp and qms, erp dead-letters it (400), then the rows of
    qms are rerouted to erp. The event was then both a dead letter of erp and queued for
    erp: sent again beside its own dead letter, and a replay would queue it a third time.
    It keeps its dead letter; the qms row is gone, audited as rerouted."""
    outbox = Outbox(tmp_path, router=lambda ev: ["erp", "qms"], maintenance_interval_s=3600)
    await outbox.open()
    [eid] = await outbox.submit([_event("A")])
    [leased] = await outbox.lease("erp", 10)
    await outbox.complete("erp", [Resolution(leased.seq, eid, "dead_letter", 400,
                                             "bad request", ordering_key="lot:A")])
    await outbox.close()

    assert _reroute(outbox, "qms", "erp") == 1

    queued, dead, audit = _state(outbox.path)
    assert queued == set(), "the event is queued beside its own dead letter"
    assert dead == {(1, "erp")}
    assert audit == ["stored", "dead_lettered", "rerouted"]
