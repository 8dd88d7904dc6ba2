"""The catalogue check at ingest, end to end: a real mosquitto, the MQTT source, the outbox
and the stand-in ERP. A source gets the check without code of its own: it maps payloads
through the shared Mapper."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.mosquitto import Broker, start_publisher, wait_connected
from tests.support import eventually, http_sink_yaml, mqtt_source_yaml, sample

pytestmark = pytest.mark.mqtt

Gateways = Callable[..., Any]

SUBSCRIPTION = """\
- topic: plant/{site}/receiving/{station}/inspection
  event: inspection.result
  fields: {lot_id: lot, serial: sn, result: result, measured: value, unit: unit,
           lower: lsl, upper: usl, characteristic: char, supplier: supplier,
           message_id: msg_id}
"""
TOPIC = "plant/test-site/receiving/st1/inspection"


def result(msg_id: str, **fields: Any) -> dict[str, Any]:
    doc = {"msg_id": msg_id, "lot": "L-0412", "sn": f"SN-{msg_id}", "result": "OK",
           "value": 10.01, "unit": "mm", "lsl": 9.95, "usl": 10.05, "char": "bore_diameter",
           "supplier": "acme"}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def quarantined(state_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(reason, detail, raw payload) of every quarantine record, oldest first."""
    uri = f"file:{state_dir / 'outbox.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT reason, detail, raw FROM quarantine ORDER BY id").fetchall()
    return [(reason, detail, orjson.loads(raw)) for reason, detail, raw in rows]


async def test_a_bad_inspection_result_is_quarantined_and_acked_a_good_one_stored(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways, tmp_path: Path) -> None:
    state = tmp_path / "state"
    body = (mqtt_source_yaml(mosquitto.url, subscriptions=SUBSCRIPTION)
            + "sinks:\n" + http_sink_yaml(erp.url))
    gw = await gateways(body, state_dir=state)
    await wait_connected(gw)

    bad = {
        "bad-measured": result("bad-measured", value="n/a"),
        "bad-limits": result("bad-limits", lsl=10.05, usl=9.95),
        "bad-nolot": result("bad-nolot", lot=None),
        "bad-result": result("bad-result", result="maybe"),
    }
    named = {"bad-measured": "measured", "bad-limits": "lower", "bad-nolot": "lot_id",
             "bad-result": "result"}
    good = [result("good-1", lot=4711, result="NOK", value="10.2"), result("good-2")]
    pub = await start_publisher(mosquitto.url)
    try:
        for doc in [good[0], *bad.values(), good[1]]:
            pub.publish(TOPIC, orjson.dumps(doc), doc["msg_id"])
        assert await asyncio.to_thread(pub.wait_acked, 15.0), "broker did not confirm"
    finally:
        pub.stop()

    # the good ones are stored and delivered, normalized
    await erp.wait_for(lambda e: {"good-1", "good-2"} <= {
        ev["data"].get("message_id") for ev in e.events}, 20.0)
    first = next(ev for ev in erp.events if ev["data"].get("message_id") == "good-1")
    assert first["type"] == "inspection.result" and first["schema_version"] == 1
    assert first["class"] == "high" and first["ordering_key"] == "lot:4711"
    assert first["data"]["lot_id"] == "4711" and first["data"]["result"] == "fail"
    assert first["data"]["measured"] == 10.2
    assert not any(str(ev["data"].get("message_id")).startswith("bad-") for ev in erp.events)

    # every message is acked: the bad ones once their quarantine record is committed
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == 6, what="all six messages acked")
    assert src.status()["unacked"] == 0
    assert (await gw.outbox.stats())["quarantine"] == {"invalid_data": 4}
    assert sample(gw, "edge_events_quarantined_total", source="line1",
                  reason="invalid_data") == 4

    # each record is kept with a detail naming the type and the failing field
    records = {raw["msg_id"]: (reason, detail) for reason, detail, raw in quarantined(state)}
    assert set(records) == set(bad)
    for msg_id, field in named.items():
        reason, detail = records[msg_id]
        assert reason == "invalid_data"
        assert detail.startswith("inspection.result: ") and field in detail, detail
