"""OPC UA source end to end: a real asyncua station → gateway → outbox → ERP over HTTP."""

from __future__ import annotations

import textwrap
from datetime import datetime

import pytest

from tests.fixtures.opcua import events_of, wait_connected, wait_failed
from tests.support import eventually, http_sink_yaml, metric

pytestmark = pytest.mark.opcua


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def body(sources: str, erp_url: str, *, extra: str = "") -> str:
    """Config body: ``sources`` (dedented) + ``extra`` (already at source-key indent)."""
    return textwrap.dedent(sources).rstrip() + "\n" + extra + "sinks:\n" + http_sink_yaml(erp_url)


def _trigger_yaml(st, *, ack: str = "") -> str:
    return textwrap.indent(textwrap.dedent(f"""\
        triggers:
          - node: "{st.node_id('ResultReady')}"
            when: true
            event: inspection.result
            ordering_key: "lot:{{lot_id}}"
            static: {{station: Station7}}
            sampling_ms: 0
            read:
              lot_id: "{st.node_id('LotId')}"
              serial: "{st.node_id('Serial')}"
              result: "{st.node_id('Result')}"
              measured: "{st.browse_path('Measured')}"
        """) + ack, "    ")


async def test_monitored_and_triggered_events_reach_the_erp(opcua_station, erp, gateways):
    st = await opcua_station()
    gw = await gateways(body(f"""
        sources:
          - id: station7
            type: opcua
            endpoint: {st.endpoint}
            publishing_ms: 50
            monitored:
              - node: "{st.node_id('Temperature')}"
                sampling_ms: 0
                static: {{station: Station7, characteristic: temperature}}
                ordering_key: "{{station}}"
              - node: "{st.browse_path('SpindleSpeed')}"
                event: machine.speed
                class: normal
    """, erp.url, extra=_trigger_yaml(st)))
    await wait_connected(gw, "station7")

    ts = await st.write("Temperature", 21.5)
    await st.publish_result(serial="S-1", result="pass", measured=10.01, lot_id="L-1")
    await erp.wait_for(lambda r: any(e["data"].get("serial") == "S-1"
                                     for e in events_of(r, "inspection.result")), 30)
    # Not edges to `true`: the same value again, other nodes, and the fall to false.
    await st.write("ResultReady", True)
    await st.write("Serial", "S-X")
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-2", result="NOK", measured=9.5, lot_id="L-1")
    # A triggered read sees the values at read time: like a real station, hold them
    # until the gateway has them before the next part.
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 2, 30)
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-3", result="ok", measured=10.0, lot_id="L-1")
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 3, 30)
    await erp.wait_for(lambda r: any(e["data"].get("value") == 21.5
                                     for e in events_of(r, "machine.reading")), 30)

    results = events_of(erp, "inspection.result")
    # One event per edge, in order (same ordering key), nothing for the non-edges.
    assert [e["data"]["serial"] for e in results] == ["S-1", "S-2", "S-3"]
    fail = results[1]
    assert fail["data"] == {"lot_id": "L-1", "serial": "S-2", "result": "fail",
                            "measured": 9.5, "station": "Station7"}
    assert fail["ordering_key"] == "lot:L-1"
    assert fail["class"] == "high"
    assert fail["source"] == "station7"
    assert fail["source_ts"] is not None and not fail["backfilled"]

    reading = next(e for e in events_of(erp, "machine.reading") if e["data"]["value"] == 21.5)
    assert reading["data"] == {"value": 21.5, "status": "Good",
                               "node": st.node_id("Temperature"),
                               "station": "Station7", "characteristic": "temperature"}
    assert _dt(reading["source_ts"]) == ts  # the node's SourceTimestamp, not receive time
    assert reading["class"] == "low" and reading["ordering_key"] == "Station7"

    speed = events_of(erp, "machine.speed")
    assert speed and speed[0]["data"]["node"] == st.browse_path("SpindleSpeed")
    assert speed[0]["data"]["value"] == 12000.0 and speed[0]["class"] == "normal"
    assert all(n == 1 for n in erp.accepted_ids.values()), "an event was delivered twice"


async def test_changes_under_the_deadband_produce_no_event(opcua_station, erp, gateways):
    st = await opcua_station()
    gw = await gateways(body(f"""
        sources:
          - id: station7
            type: opcua
            endpoint: {st.endpoint}
            publishing_ms: 50
            monitored:
              - node: "{st.node_id('Temperature')}"
                sampling_ms: 0
                deadband: {{absolute: 0.5}}
                ordering_key: "line"
              - node: "{st.node_id('PartCounter')}"
                sampling_ms: 0
                ordering_key: "line"
    """, erp.url))
    await wait_connected(gw, "station7")
    await erp.wait_for(lambda r: len(events_of(r, "machine.reading")) >= 2, 30)  # initial
    for value in (20.2, 21.0, 21.3, 21.4, 19.0):
        await st.write("Temperature", value)
    await st.write("PartCounter", 99)  # sentinel with the same ordering key: FIFO
    await erp.wait_for(lambda r: any(e["data"]["value"] == 99
                                     for e in events_of(r, "machine.reading")), 30)
    temps = [e["data"]["value"] for e in events_of(erp, "machine.reading")
             if e["data"]["node"] == st.node_id("Temperature")]
    assert temps == [20.0, 21.0, 19.0]


async def test_trigger_ack_is_written_after_the_commit(opcua_station, erp, gateways):
    st = await opcua_station()
    ack = f"""    ack: {{node: "{st.node_id('ResultReady')}", value: false}}\n"""
    gw = await gateways(body(f"""
        sources:
          - id: station7
            type: opcua
            endpoint: {st.endpoint}
    """, erp.url, extra=_trigger_yaml(st, ack=ack)))
    await wait_connected(gw, "station7")
    await st.publish_result(serial="S-9", lot_id="L-9", result="pass", measured=1.0)
    await eventually(lambda: metric(gw.metrics.events_received, "station7") >= 1,
                     timeout=30, what="the result to be stored")

    async def acknowledged() -> bool:
        return not await st.read("ResultReady")

    await eventually(acknowledged, timeout=30,
                     what="the gateway to acknowledge the result (ResultReady false)")
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)


async def test_node_problems_are_located_and_other_sources_keep_running(
    opcua_station, erp, gateways
):
    st = await opcua_station()
    gw = await gateways(body(f"""
        sources:
          - id: bad7
            type: opcua
            endpoint: {st.endpoint}
            monitored:
              - {{node: "{st.node_id('Temperature')}"}}
              - {{node: "ns=2;s=Station7.Nope"}}
              - {{node: "/Objects/2:Station7/2:Missing"}}
              - {{node: "ns=2;s=Station7"}}
              - {{node: "{st.node_id('LotId')}", deadband: {{absolute: 1}}}}
              - {{node: "{st.node_id('SpindleSpeed')}", deadband: {{percent: 5}}}}
            triggers:
              - node: "{st.node_id('ResultReady')}"
                when: 1
                event: inspection.result
                read: {{lot_id: "nsu=urn:not-there;s=X"}}
          - id: good7
            type: opcua
            endpoint: {st.endpoint}
            monitored:
              - {{node: "{st.node_id('Temperature')}", sampling_ms: 0}}
    """, erp.url))
    error = await wait_failed(gw, "bad7")
    assert "sources[bad7].monitored[1].node: BadNodeIdUnknown (ns=2;s=Station7.Nope)" in error
    assert "sources[bad7].monitored[2].node: BadNoMatch" in error
    assert "sources[bad7].monitored[3].node: ns=2;s=Station7 is an Object, not a Variable" \
        in error
    assert "sources[bad7].monitored[4].deadband: needs a numeric node" in error
    assert "sources[bad7].monitored[5].deadband.percent: the server has no EURange" in error
    assert "sources[bad7].triggers[0].when: 1 does not fit the node's data type Boolean" in error
    assert "sources[bad7].triggers[0].read.lot_id: namespace 'urn:not-there' is not on the " \
        "server" in error
    assert gw.status["bad7"].restarts == 0  # fatal: not retried in a loop
    await wait_connected(gw, "good7")
    await erp.wait_for(lambda r: len(events_of(r, "machine.reading", "good7")) >= 1, 30)
    assert not events_of(erp, "machine.reading", "bad7")
