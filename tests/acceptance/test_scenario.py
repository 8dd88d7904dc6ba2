"""Acceptance: the receiving-inspection scenario of the quality workflow, end to end.

Goods arrive: the warehouse scanner publishes a receipt over MQTT (with the supplier). The
inspection station (the OPC UA simulator, with the handshake) measures parts of the lot;
some fail. The ERP is down for the first part. The gateway must:

- put the lot on hold on the plant broker (retained, QoS 1) at once, before the ERP has
  anything of the lot;
- give the ERP the hold before any later status of the lot, in order;
- give the QMS one nonconformance per failed part and one supplier case per episode, and
  the supplier portal the supplier case;
- after a release (the MES publishes ``lot.status: released``), open a second episode on
  the next failure, with its own hold and case; ``edge lot release`` ends that one;
- replace the retained hold with the release, so a controller that connects later sees the
  lot free;
- send every request with its ``Idempotency-Key`` (the event id) and, for what the failing
  result caused, that result's correlation id (``X-Correlation-ID``);
- report a mismatch injected in the ERP (the lot on hold locally, available in the ERP) by
  its reconciliation: in ``/status``, the metric, and once in the log.

Real components throughout: mosquitto, an asyncua server, three HTTP stand-ins on loopback
(ERP, QMS, supplier portal), the gateway in this process and the ``edge`` CLI.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from edge.app import Gateway
from edge.config import load_config_text
from edge.sim.erp import ErpReceiver
from edge.sim.mqtt_station import lot_status, receipt
from edge.sim.opcua_station import Station
from tests.acceptance.support import Watcher
from tests.fixtures.mosquitto import Broker, start_publisher, wait_connected
from tests.support import (
    api_yaml,
    eventually,
    free_port,
    http_sink_yaml,
    run_edge,
    sample,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.opcua]

SITE = "test-site"
LOT = "L-0412"
SUPPLIER = "acme"
HOLD_TOPIC = f"plant/{SITE}/lot/{LOT}/hold"

ERP_ROUTES = ('[{events: [lot.status, quality.hold], method: PUT, '
              'path: "/lots/{data.lot_id}/status"}, '
              '{events: [material.receipt], method: POST, path: /goods-receipts}, '
              '{events: [notification], method: POST, path: /notifications}]')
QMS_ROUTES = ('[{events: [inspection.result], method: POST, path: /inspection-results}, '
              '{events: [nonconformance], method: POST, path: /nonconformances}, '
              '{events: [supplier.case], method: POST, path: /supplier-cases}, '
              '{events: [capa.request], method: POST, path: /capa-requests}, '
              '{events: [quality.hold, quality.release], method: POST, '
              'path: "/lots/{data.lot_id}/holds"}]')
PORTAL_ROUTES = ('[{events: [supplier.case], method: POST, '
                 'path: "/suppliers/{data.supplier}/cases", body: data}]')


def config(broker: Broker, station: Station, erp: str, qms: str, portal: str,
           api_port: int) -> str:
    n = station.node_id
    sources = textwrap.dedent(f"""\
        sources:
          - id: line1
            type: mqtt
            url: {broker.url}
            client_id: acceptance-line1
            reconnect_initial_s: 0.05
            reconnect_max_s: 0.5
            subscriptions:
              - topic: plant/{{site}}/warehouse/{{location}}/receipt
                event: material.receipt
                fields: {{lot_id: lot, material: material, supplier: supplier,
                         supplier_lot: supplier_lot, quantity: qty, unit: unit,
                         purchase_order: po, message_id: msg_id}}
              - topic: plant/{{site}}/mes/lot/{{lot}}/status
                event: lot.status
                fields: {{lot_id: lot, status: status, decided_by: decided_by,
                         reason: reason, message_id: msg_id}}
          - id: station7
            type: opcua
            endpoint: {station.endpoint}
            publishing_ms: 50
            triggers:
              - node: "{n('ResultReady')}"
                when: true
                event: inspection.result
                ordering_key: "lot:{{lot_id}}"
                static: {{station: Station7, characteristic: bore_diameter, unit: mm}}
                read: {{lot_id: "{n('LotId')}", serial: "{n('Serial')}",
                       result: "{n('Result')}", measured: "{n('Measured')}"}}
                ack: {{node: "{n('ResultReady')}", value: false}}
        rules:
          - {{type: spec_limits, events: [inspection.result], characteristic: bore_diameter,
             lower: 9.95, upper: 10.05}}
        quality:
          stuck_after_s: 3600
          reconcile:
            every_s: 0.3
            sources: [{{sink: erp, path: "/lots/{{lot_id}}/status", field: status}}]
        """)
    sinks = ("sinks:\n"
             + http_sink_yaml(erp, sink_id="erp", routes=ERP_ROUTES)
             + http_sink_yaml(qms, sink_id="qms", routes=QMS_ROUTES)
             + http_sink_yaml(portal, sink_id="supplier-portal", routes=PORTAL_ROUTES)
             + f"  - id: line-holds\n"
               f"    type: mqtt\n"
               f"    url: {broker.url}\n"
               f"    client_id: acceptance-line-holds\n"
               f"    routes:\n"
               f"      - {{events: [quality.hold, quality.release, lot.status], qos: 1,\n"
               f"         topic: \"plant/{{site}}/lot/{{data.lot_id}}/hold\", retain: true}}\n")
    return (f"site: {SITE}\nstate_dir: state\n" + api_yaml(api_port) + sources + sinks)


def lot_events(receiver: ErpReceiver, type_: str | None = None) -> list[dict[str, Any]]:
    return [e for e in receiver.events
            if e.get("ordering_key") == f"lot:{LOT}" and type_ in (None, e.get("type"))]


def erp_status(receiver: ErpReceiver) -> Any:
    """The lot's status as the ERP stand-in would answer a read."""
    found = receiver.lot_status.get(LOT)
    return found.get("status") if isinstance(found, dict) else found


def summary(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(type, status, episode or audience) of each event: the lot's story as a receiver
    saw it."""
    return [(e["type"], next((e["data"][k] for k in ("status", "audience", "episode")
                              if k in e["data"]), None)) for e in events]


async def inspect(station: Station, serial: str, *, fail: bool = False) -> None:
    """One part through the station: the result, then wait for the gateway's ack (it
    writes ResultReady back to false only after the result is committed)."""
    await station.publish_result(serial=serial, lot_id=LOT, result="fail" if fail else "pass",
                                 measured=10.21 if fail else 10.01)
    async with asyncio.timeout(20):
        await station.wait_acknowledged()


async def test_receiving_inspection_hold_release_and_second_episode(
        mosquitto: Broker, opcua_station: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge.quality.reconcile")
    station: Station = await opcua_station(handshake=True)
    # the ERP keeps each lot's status as its lot.status requests set it, and answers the
    # gateway's reconciliation reads (GET /lots/{lot}/status) with it
    receivers = [ErpReceiver(reflect_status=True), ErpReceiver(), ErpReceiver()]
    for r in receivers:
        await r.start()
    erp, qms, portal = receivers
    watcher = await asyncio.to_thread(Watcher(mosquitto.url, f"plant/{SITE}/lot/+/hold").start)
    publisher = await start_publisher(mosquitto.url)
    gw: Gateway | None = None
    try:
        erp.outage(True)  # the cloud link to the ERP is down for the first part
        api_port = free_port()
        text = config(mosquitto, station, erp.url, qms.url, portal.url, api_port)
        cfg_path = tmp_path / "edge.yaml"
        cfg_path.write_text(text)
        gw = Gateway(load_config_text(text, base_dir=tmp_path))
        await gw.start()
        await wait_connected(gw, "line1")
        await wait_connected(gw, "station7")

        # --- goods arrive: the warehouse scanner books the receipt with its supplier
        publisher.publish(*receipt(SITE, LOT, supplier=SUPPLIER))
        await eventually(lambda: (lot := gw.outbox.quality.lots.get(LOT)) is not None
                         and lot.supplier == SUPPLIER, what="the receipt's lot and supplier")

        # --- receiving inspection, ERP down: a pass, a failure, a pass, a failure
        await inspect(station, "S1")
        await inspect(station, "S2", fail=True)
        holds = await eventually(lambda: watcher.of_type("quality.hold"),
                                 what="the local hold on the plant broker")
        assert not lot_events(erp), "the ERP had something of the lot before the line's hold"
        assert holds[0].topic == HOLD_TOPIC and holds[0].qos == 1
        assert holds[0].doc["data"]["serial"] == "S2"
        await inspect(station, "S3")
        await inspect(station, "S4", fail=True)
        # a controller that connects now still learns of the hold: the broker retained it
        late = await asyncio.to_thread(Watcher(mosquitto.url, HOLD_TOPIC).start)
        try:
            retained = await eventually(lambda: late.seen, what="the retained hold")
        finally:
            await asyncio.to_thread(late.stop)
        assert retained[0].retain and retained[0].qos == 1
        assert (retained[0].doc["type"], retained[0].doc["data"].get("status")) == (
            "lot.status", "hold")
        assert gw.outbox.quality.lots[LOT].state == "hold"

        # --- the ERP comes back: the lot's backlog arrives in order
        erp.outage(False)
        await erp.wait_for(lambda r: ("lot.status", "hold") in summary(lot_events(r)),
                           within_s=30)
        await qms.wait_for(lambda r: {e["data"].get("serial") for e in lot_events(
            r, "nonconformance")} == {"S2", "S4"}, within_s=30)
        await portal.wait_for(lambda r: len(r.events) == 1, within_s=30)

        # --- the QMS releases the lot; the MES publishes the decision to the plant broker
        publisher.publish(*lot_status(SITE, LOT, "released", decided_by="QMS: A. Inspector",
                                      reason="sorted, 2 parts scrapped"))
        await eventually(lambda: gw.outbox.quality.lots[LOT].state == "released",
                         what="the lot released by the MES's decision")
        # the MES's lot.status, then the quality.release the gateway derives from it: the
        # retained hold is replaced also on a route that carries only holds and releases
        await eventually(lambda: [(s.doc["type"], s.doc["data"].get("decided_by"))
                                  for s in watcher.seen if s.topic == HOLD_TOPIC][-1:]
                         == [("quality.release", "QMS: A. Inspector")],
                         what="the release on the line's hold topic")

        # --- a new failure after the release opens episode 2 with its own hold and case
        await inspect(station, "S5")
        await inspect(station, "S6", fail=True)
        await eventually(lambda: [h.doc["data"].get("episode")
                                  for h in watcher.of_type("quality.hold")] == [1, 2],
                         what="the second episode's hold on the plant broker")
        await portal.wait_for(lambda r: len(r.events) == 2, within_s=30)

        # --- someone books the held lot as available in the ERP: the reconciliation says so
        await erp.wait_for(lambda r: erp_status(r) == "hold"
                           and ("quality.hold", 2) in summary(lot_events(r)), within_s=30)
        erp.lot_status[LOT] = {"status": "available", "decided_by": "ERP: planner"}
        reconciler = gw.reconciler
        assert reconciler is not None
        mismatch = await eventually(lambda: reconciler.section()["mismatch_lots"],
                                    what="the injected mismatch in /status")
        assert [(m["lot_id"], m["local"], [x["between"] for x in m["mismatches"]])
                for m in mismatch] == [(LOT, "hold", ["local/erp"])]
        assert sample(gw, "edge_lot_status_mismatch", between="local/erp") == 1
        seen_in = reconciler.section()["rounds"]
        await eventually(lambda: reconciler.section()["rounds"] >= seen_in + 2,
                         what="two more reconciliation rounds")
        logged = [r for r in caplog.records if "lot status mismatch" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert gw.outbox.quality.lots[LOT].state == "hold"  # an ERP's word is not applied

        # --- the operator ends episode 2 with the CLI, against the running gateway
        rc, out, err = await run_edge("lot", "release", LOT, "-c", str(cfg_path), "--reason",
                                      "re-measured, within limits", "--by", "J. Doe",
                                      cwd=tmp_path)
        assert rc == 0, err
        assert f"lot {LOT} released by J. Doe (episode 2, was hold)" in out
        await eventually(lambda: [s.doc["type"] for s in watcher.seen
                                  if s.topic == HOLD_TOPIC][-1:] == ["quality.release"],
                         what="the CLI's release on the line's hold topic")
        late = await asyncio.to_thread(Watcher(mosquitto.url, HOLD_TOPIC).start)
        try:
            retained = await eventually(lambda: late.seen, what="the retained release")
        finally:
            await asyncio.to_thread(late.stop)
        assert retained[0].retain and retained[0].doc["type"] == "quality.release"
        assert retained[0].doc["data"]["decided_by"] == "J. Doe"
        # released locally and (once the release arrived) in the ERP: no mismatch left
        await eventually(lambda: reconciler.section()["mismatches"] == 0,
                         what="the mismatch resolved by the release")

        episode = [("lot.status", "hold"), ("notification", "procurement"),
                   ("notification", "planning")]
        expected_erp = [("material.receipt", None),
                        ("quality.hold", 1), *episode, ("lot.status", "released"),
                        ("quality.hold", 2), *episode, ("lot.status", "released")]
        await erp.wait_for(lambda r: len(lot_events(r)) >= len(expected_erp), within_s=30)
        # one release per episode: the MES's decision (derived) and the operator's
        await qms.wait_for(lambda r: [e["data"]["decided_by"] for e in lot_events(
            r, "quality.release")] == ["QMS: A. Inspector", "J. Doe"], within_s=30)
    finally:
        if gw is not None:
            await gw.stop()
        await asyncio.to_thread(publisher.stop)
        await asyncio.to_thread(watcher.stop)
        for r in receivers:
            await r.stop()

    # --- the line had its hold before the ERP accepted anything of the lot
    first_erp = min(r.mono for r in erp.requests if r.applied and any(
        e.get("ordering_key") == f"lot:{LOT}" for e in r.events))
    assert holds[0].mono < first_erp

    # --- the ERP: the hold first, then every later status of the lot, in order, once each
    erp_lot = lot_events(erp)
    assert summary(erp_lot) == expected_erp, summary(erp_lot)
    assert len({e["id"] for e in erp_lot}) == len(erp_lot)

    # --- the QMS: one nonconformance per failed part, one supplier case per episode
    results = {e["data"]["serial"]: e for e in lot_events(qms, "inspection.result")}
    assert sorted(results) == ["S1", "S2", "S3", "S4", "S5", "S6"]
    failed = {s: results[s] for s in ("S2", "S4", "S6")}
    ncs = lot_events(qms, "nonconformance")
    assert sorted(e["data"]["serial"] for e in ncs) == ["S2", "S4", "S6"]
    assert len({e["id"] for e in ncs}) == 3
    cases = lot_events(qms, "supplier.case")
    assert [(c["data"]["supplier"], c["data"]["inspection_event_id"]) for c in cases] == [
        (SUPPLIER, failed["S2"]["id"]), (SUPPLIER, failed["S6"]["id"])]
    assert summary(lot_events(qms, "quality.hold")) == [("quality.hold", 1),
                                                        ("quality.hold", 2)]

    # --- the supplier portal: the same two cases (the body is the case; its key the id)
    portal_keys = [r.headers.get("idempotency-key") for r in portal.requests if r.applied]
    assert portal_keys == [c["id"] for c in cases]
    assert [e["lot_id"] for e in portal.events] == [LOT, LOT]
    assert {e["supplier_lot"] for e in portal.events} == {f"ACM-{LOT}"}

    # --- every request: its Idempotency-Key, and the failing result's correlation id on
    #     what that result caused (an episode's events: its first failing part)
    cause_of_episode = {1: failed["S2"], 2: failed["S6"]}
    failed_by_id = {e["id"]: e for e in failed.values()}
    by_id = {e["id"]: e for r in (erp, qms) for e in r.events}
    checked: set[str] = set()
    for receiver, name in ((erp, "ERP"), (qms, "QMS"), (portal, "portal")):
        assert receiver.requests, name
        for req in receiver.requests:
            key = req.headers.get("idempotency-key")
            assert key, f"{name} {req.method} {req.path} without an Idempotency-Key"
            if name != "portal":
                [sent] = req.events  # single-event routes: the key is the event's id
                assert key == sent["id"], (name, req.path)
            event = by_id.get(key)
            if event is None or event["source"] != "rules":
                continue  # a source's record, or the CLI's release: nothing failed behind it
            data = event["data"]
            if event["type"] == "quality.release":  # derived from a release decided elsewhere
                cause = by_id.get(data["lot_status_event_id"])
                assert cause is not None and cause["data"]["status"] == "released", event
                assert req.headers.get("x-correlation-id") == cause["correlation_id"]
                checked.add(f"{name} {event['type']}")
                continue
            cause = failed_by_id.get(data.get("inspection_event_id")
                                     or data.get("cause_event_id") or "")
            if cause is None and event["type"] == "lot.status":
                assert data["status"] == "hold", event
                cause = cause_of_episode[data["episode"]]
            assert cause is not None, f"{event['type']} of the rules without its cause"
            assert event["correlation_id"] == cause["correlation_id"], (name, event["type"])
            assert req.headers.get("x-correlation-id") == cause["correlation_id"], (
                name, event["type"], req.path)
            checked.add(f"{name} {event['type']}")
    assert checked >= {"ERP quality.hold", "ERP lot.status", "ERP notification",
                       "QMS nonconformance", "QMS supplier.case", "QMS quality.hold",
                       "portal supplier.case"}, checked
