"""Two samples are two events: the identity of an OPC UA sample is its node, its source
timestamp AND what it says (value, status). Bad and Uncertain samples are events with
their status unless the config quarantines them."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime

import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import http_sink_yaml, metric

pytestmark = pytest.mark.opcua

GOOD, UNCERTAIN_LAST_USABLE, BAD_SENSOR_FAILURE = 0, 0x40900000, 0x808C0000


def _body(st, erp_url: str, item_extra: str = "") -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {st.endpoint}
            publishing_ms: 50
            monitored:
              - node: "{st.node_id('Temperature')}"
                sampling_ms: 0
                queue_size: 100
                ordering_key: "t"
        """) + item_extra + "sinks:\n" + http_sink_yaml(erp_url)


async def _sentinel(st, erp, value: float) -> None:
    await st.write("Temperature", value)
    await erp.wait_for(lambda r: any(e["data"].get("value") == value
                                     for e in events_of(r, "machine.reading")), 30)


async def test_two_values_or_statuses_in_one_clock_tick_are_two_events(
    opcua_station, erp, gateways
):
    st = await opcua_station()
    gw = await gateways(_body(st, erp.url))
    await wait_connected(gw, "station7")
    tick = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
    await st.write("Temperature", 21.0, ts=tick)
    await asyncio.sleep(0.3)  # separate publishes: the server keeps both
    await st.write("Temperature", 22.0, ts=tick)  # second value, same clock tick
    await asyncio.sleep(0.3)
    # the device loses its sensor: the last usable value again, now Uncertain, old time
    await st.write("Temperature", 22.0, ts=tick, status=UNCERTAIN_LAST_USABLE)
    await _sentinel(st, erp, 99.0)

    at_tick = [e for e in events_of(erp, "machine.reading") if e["source_ts"].startswith(
        "2026-03-01T08:00:00")]
    assert [(e["data"]["value"], e["data"]["status"]) for e in at_tick] == [
        (21.0, "Good"), (22.0, "Good"), (22.0, "UncertainLastUsableValue")]
    assert len({e["id"] for e in at_tick}) == 3


async def test_a_bad_sample_is_an_event_with_its_status(opcua_station, erp, gateways):
    st = await opcua_station()
    gw = await gateways(_body(st, erp.url))
    await wait_connected(gw, "station7")
    await st.write("Temperature", None, status=BAD_SENSOR_FAILURE)
    await _sentinel(st, erp, 23.0)
    readings = [e["data"] for e in events_of(erp, "machine.reading")]
    assert {"value": None, "status": "BadSensorFailure"}.items() <= readings[-2].items()
    assert readings[-1]["status"] == "Good"
    assert metric(gw.metrics.events_quarantined, "station7", "bad_status") == 0


@pytest.mark.parametrize(("setting", "quarantined_statuses"), [
    ("bad", ["BadSensorFailure"]),
    ("not_good", ["UncertainLastUsableValue", "BadSensorFailure"]),
])
async def test_quarantine_status_keeps_such_samples_out_of_the_events(
    opcua_station, erp, gateways, setting, quarantined_statuses
):
    st = await opcua_station()
    gw = await gateways(_body(st, erp.url, f"        quarantine_status: {setting}\n"))
    await wait_connected(gw, "station7")
    await st.write("Temperature", 21.5, status=UNCERTAIN_LAST_USABLE)
    await asyncio.sleep(0.3)
    await st.write("Temperature", None, status=BAD_SENSOR_FAILURE)
    await _sentinel(st, erp, 24.0)
    stored = {e["data"]["status"] for e in events_of(erp, "machine.reading")}
    assert not stored & set(quarantined_statuses)
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT reason, detail FROM quarantine WHERE source = 'station7' ORDER BY id"
    ).fetchall())
    assert [r[0] for r in rows] == ["bad_status"] * len(quarantined_statuses)
    assert [r[1].split(": ")[-1] for r in rows] == quarantined_statuses


def test_the_same_sample_read_live_or_from_history_has_one_key():
    from asyncua import ua

    from edge.sources.opcua.values import OVERFLOW_BITS, sample_key

    tick = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
    live = sample_key("ns=2;s=T", tick, 21.0, ua.StatusCode(ua.UInt32(OVERFLOW_BITS)))
    assert live == sample_key("ns=2;s=T", tick, 21.0, ua.StatusCode(ua.UInt32(GOOD)))
    assert live != sample_key("ns=2;s=T", tick, 21.5, None)
    assert live != sample_key("ns=2;s=T", tick, 21.0,
                              ua.StatusCode(ua.UInt32(UNCERTAIN_LAST_USABLE)))
    assert live.startswith("ns=2;s=T@2026-03-01T08:00:00Z#")
