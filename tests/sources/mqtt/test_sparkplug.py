"""Sparkplug B subscriptions against a real mosquitto: a simulated edge node (its own
protobuf writer, ``edge.sim.sparkplug_node``) → the gateway (``edge`` with an ``mqtt``
source, ``format: sparkplug_b``) → the stand-in ERP.

Births and data become ``machine.reading`` events resolved by alias; a sequence gap and
an NDEATH are audited as gaps; data the gateway cannot resolve is quarantined
(``unknown_alias``), the node is asked for a rebirth on the broker and later data is
resolved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from edge.sim.erp import ErpReceiver
from edge.sim.sparkplug_node import SparkplugNode
from tests.fixtures.mosquitto import Broker, wait_connected
from tests.support import eventually, http_sink_yaml, mqtt_source_yaml, sample

pytestmark = pytest.mark.mqtt

Gateways = Callable[..., Any]

SUBSCRIPTION = """\
- topic: spBv1.0/{group}/#
  format: sparkplug_b
  sparkplug: {rebirth_interval_s: 30}
"""


def config(broker: Broker, erp: ErpReceiver, subscription: str = SUBSCRIPTION) -> str:
    return (mqtt_source_yaml(broker.url, subscriptions=subscription)
            + "sinks:\n" + http_sink_yaml(erp.url))


def readings(erp: ErpReceiver) -> list[dict[str, Any]]:
    return [e for e in erp.events if e["type"] == "machine.reading"]


def signals(erp: ErpReceiver) -> list[str]:
    return [e["data"]["signal"] for e in readings(erp)]


async def audit_rows(gw: Any) -> list[tuple[str, str | None]]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT state, reason FROM audit WHERE event_id IS NULL ORDER BY seq").fetchall())
    return [(r[0], r[1]) for r in rows]


async def quarantined(gw: Any) -> dict[str, int]:
    stats = await gw.outbox.stats()
    return dict(stats["quarantine"])


async def node_up(broker: Broker, **options: Any) -> SparkplugNode:
    births = options.pop("births", True)
    node = SparkplugNode(broker.url, group="plant1", node="press7", qos=1, seed=7, **options)
    await node.start(births=births)
    return node


async def test_births_and_data_become_readings_resolved_by_alias(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto, erp))
    await wait_connected(gw)
    node = await node_up(mosquitto, devices=["dev1", "dev2"], rate=50)
    for _ in range(10):  # 8 DDATA (2 metrics each), 2 NDATA (1 metric)
        node.publish_data()
    assert await node.wait_confirmed()
    # births: 1 node metric + 4 per device (bdSeq and Node Control are state, not readings)
    expected = 1 + 2 * 4 + 8 * 2 + 2 * 1
    await eventually(lambda: len(readings(erp)) >= expected, what="every metric delivered")
    await node.stop()
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["sparkplug"]["deaths"] == 1, what="the NDEATH")
    assert len(readings(erp)) == expected

    by_signal: dict[str, list[dict[str, Any]]] = {}
    for e in readings(erp):
        by_signal.setdefault(e["data"]["signal"], []).append(e)
    assert set(by_signal) == {
        "press7/Cabinet/Temperature",
        *(f"press7/{d}/{m}" for d in ("dev1", "dev2")
          for m in ("Spindle/Speed", "Spindle/Temperature", "Running", "Parts"))}
    birth_speed = by_signal["press7/dev1/Spindle/Speed"][0]
    assert birth_speed["data"]["value"] == 1200 and birth_speed["data"]["datatype"] == "Int32"
    assert birth_speed["ordering_key"] == "spb:plant1/press7/dev1"
    assert birth_speed["class"] == "low"
    # DDATA carried aliases only: names, datatypes and units come from the DBIRTH
    temps = by_signal["press7/dev1/Spindle/Temperature"]
    assert len(temps) == 1 + 4
    assert all(t["data"]["unit"] == "C" and t["data"]["datatype"] == "Float" for t in temps)
    assert all(isinstance(t["data"]["value"], float) for t in temps)
    parts = [e["data"]["value"] for e in by_signal["press7/dev1/Parts"]]
    assert parts == [0, 1, 2, 3, 4]  # per device in order (its ordering key)
    assert temps[1]["data"] | {"value": 0} == {
        "signal": "press7/dev1/Spindle/Temperature", "value": 0, "unit": "C",
        "station": "dev1", "group": "plant1", "edge_node": "press7", "device": "dev1",
        "metric": "Spindle/Temperature", "datatype": "Float"}
    assert temps[1]["source_ts"] is not None
    assert by_signal["press7/Cabinet/Temperature"][0]["data"]["station"] == "press7"
    st = src.status()["sparkplug"]
    assert st["edge_nodes"] == 1 and st["births"] == 3 and st["seq_gaps"] == 0
    assert await quarantined(gw) == {}
    assert sample(gw, "edge_source_gaps_total", source="line1") == 1  # the NDEATH at stop


async def test_seq_gap_and_node_death_are_recorded_as_gaps(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto, erp))
    await wait_connected(gw)
    node = await node_up(mosquitto)
    node.publish_data()
    node.skip_seq(3)  # three messages lost on the way
    node.publish_data()
    assert await node.wait_confirmed()
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["sparkplug"]["seq_gaps"] == 1, what="the seq gap")
    # a gap may hide a birth: the node is asked for a new one, and answers it
    await eventually(lambda: node.rebirth_requests == 1, what="NCMD Rebirth on the broker")
    node.tick()
    assert node.births == 2

    await node.crash()  # no DISCONNECT: the broker publishes the NDEATH will
    await eventually(lambda: src.status()["sparkplug"]["deaths"] == 1, what="the NDEATH")
    conditions = gw.status["line1"].conditions
    assert "sparkplug_offline:plant1/press7" in conditions
    rows = await eventually(lambda: _has(audit_rows(gw), ("gap", "sparkplug_node_death")),
                            what="the death in the audit trail")
    assert ("gap", "sparkplug_seq_gap") in rows
    assert ("rebirth_requested", "sequence_gap") in rows
    assert sample(gw, "edge_source_gaps_total", source="line1") == 2

    # the node comes back: a new session (bdSeq + 1) and births clear the condition
    node2 = SparkplugNode(mosquitto.url, group="plant1", node="press7", qos=1)
    node2.bd_seq = node.bd_seq
    await node2.start()
    await eventually(lambda: "sparkplug_offline:plant1/press7"
                     not in gw.status["line1"].conditions, what="the condition cleared")
    # the audit row is committed after the condition clears
    await eventually(lambda: _has(audit_rows(gw), ("reconnected", "sparkplug_node_birth")),
                     what="the birth in the audit trail")
    await node2.stop()


async def _has(rows_coro: Any, row: tuple[str, str]) -> Any:
    rows = await rows_coro
    return rows if row in rows else None


async def test_unknown_alias_is_quarantined_and_a_rebirth_resolves_later_data(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto, erp))
    await wait_connected(gw)
    # the node was born before the gateway listened (or the gateway restarted since):
    # its data carries aliases the gateway has never seen
    node = await node_up(mosquitto, births=False)
    for _ in range(3):
        node.publish_data()
    assert await node.wait_confirmed()
    await eventually(lambda: node.rebirth_requests >= 1, what="NCMD Rebirth on the broker")
    q = await eventually(lambda: _quarantine_count(gw), what="quarantined data")
    assert set(q) == {"unknown_alias"}
    node.tick()  # answers the request: NBIRTH + DBIRTH
    node.publish_data()
    assert await node.wait_confirmed()
    await eventually(lambda: signals(erp).count("press7/dev1/Parts") == 2,
                     what="the birth and the data after it")
    parts = [e["data"]["value"] for e in readings(erp) if e["data"]["signal"] ==
             "press7/dev1/Parts"]
    assert parts == [3, 4]  # the birth's current value, then the new DDATA
    # one request per node within rebirth_interval_s, however many messages missed
    await asyncio.sleep(0.3)
    assert node.rebirth_requests == 1
    assert (await quarantined(gw)) == {"unknown_alias": 3}  # one record per message
    await node.stop()


async def _quarantine_count(gw: Any) -> dict[str, int] | None:
    q = await quarantined(gw)
    return q or None


async def test_alias_tables_survive_a_gateway_restart(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways, tmp_path: Any) -> None:
    state = tmp_path / "gw-state"
    gw = await gateways(config(mosquitto, erp), state_dir=state)
    await wait_connected(gw)
    node = await node_up(mosquitto)
    node.publish_data()
    assert await node.wait_confirmed()
    await eventually(lambda: signals(erp).count("press7/dev1/Parts") == 2, what="first data")
    await gw.stop()
    for _ in range(3):  # kept by the broker for the gateway's persistent session
        node.publish_data()
    assert await node.wait_confirmed()

    gw2 = await gateways(config(mosquitto, erp), state_dir=state)
    await eventually(lambda: signals(erp).count("press7/dev1/Parts") == 5,
                     what="the data queued during the restart, resolved")
    parts = [e["data"]["value"] for e in readings(erp)
             if e["data"]["signal"] == "press7/dev1/Parts"]
    assert parts == [0, 1, 2, 3, 4]
    assert await quarantined(gw2) == {}
    assert node.rebirth_requests == 0
    assert gw2.sources["line1"].status()["sparkplug"]["seq_gaps"] == 0
    await node.stop()
