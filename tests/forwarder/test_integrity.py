"""A stored event whose bytes no longer match the SHA-256 taken at ingest is dead-lettered
before sending, and with ``on_dead_letter: park`` it holds its key like any dead letter:
the later events of its lot in the same lease are not sent.

Real gateway, real HTTP sink, real loopback ERP.
"""

from __future__ import annotations

import asyncio
import sqlite3

import orjson

from edge.outbox import queries
from tests.support import eventually, result, sink_yaml


def _tamper(event_id: str):
    def change(conn: sqlite3.Connection) -> None:
        body = orjson.loads(conn.execute("SELECT body FROM events WHERE id = ?",
                                         (event_id,)).fetchone()[0])
        body["data"]["result"] = "fail"
        conn.execute("UPDATE events SET body = ? WHERE id = ?", (orjson.dumps(body), event_id))
    return change


async def _stored_with_lot_a_changed(gateways, erp, extra: str = ""):
    """A0, A1, A2 and B3 stored while the ERP is down; A0's stored bytes are changed while
    no gateway runs (a running one may hold A0's original bytes in a lease it is sending,
    and deliver them the moment the ERP is back); then a gateway starts on that outbox."""
    erp.outage(True)
    body = sink_yaml(erp.url, extra=extra)
    first = await gateways(body)
    ids = await first.pipeline.submit([result("A", 0), result("A", 1), result("A", 2),
                                       result("B", 3)])
    await first.stop()
    conn = sqlite3.connect(first.outbox.path)
    with conn:
        _tamper(ids[0])(conn)
    conn.close()
    erp.outage(False)
    return await gateways(body), ids


async def test_later_events_of_a_changed_events_key_are_not_sent_in_the_same_lease(
        gateways, erp):
    """Before, A1 and A2 were sent right after A0 was dead-lettered, in the same lease."""
    gw, [a0, a1, a2, b3] = await _stored_with_lot_a_changed(gateways, erp)
    await erp.wait_for(lambda e: b3 in e.ids(), within_s=15)
    [dl] = await eventually(lambda: gw.outbox.read(queries.dlq_list))
    assert dl["event_id"] == a0 and dl["reason"].startswith("integrity")
    await asyncio.sleep(1.0)  # a window in which the parked events must not be sent
    assert a1 not in erp.ids() and a2 not in erp.ids()  # parked behind the dead letter
    assert a0 not in erp.ids()
    assert (await gw.outbox.stats())["events"] >= 2  # A1 and A2 are kept


async def test_with_on_dead_letter_continue_the_later_events_flow_on(gateways, erp):
    gw, [a0, a1, a2, b3] = await _stored_with_lot_a_changed(
        gateways, erp, extra="on_dead_letter: continue")
    await erp.wait_for(lambda e: {a1, a2, b3} <= set(e.ids()), within_s=15)
    assert [i for i in erp.ids() if i in (a1, a2)] == [a1, a2]
    assert a0 not in erp.ids()
