"""Gaps: a station killed and restarted, a gateway restarted — samples recovered from the
station's history, none missing, none twice."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime

import pytest
from asyncua import Client

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, free_port, http_sink_yaml, metric

pytestmark = pytest.mark.opcua


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _body(endpoint: str, node: str, erp_url: str) -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            publishing_ms: 100
            watchdog_s: 0.5
            reconnect_max_s: 2
            backfill: {{first_sample_wait_s: 5}}
            monitored:
              - {{node: "{node}", sampling_ms: 0, queue_size: 100, ordering_key: "t"}}
        sinks:
    """) + http_sink_yaml(erp_url)


async def _history(endpoint: str, node: str) -> list[datetime]:
    async with Client(endpoint) as client:
        values = await client.get_node(node).read_raw_history(
            datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC), numvalues=0)
    return sorted(dv.SourceTimestamp.astimezone(UTC) for dv in values)


async def _audit_states(gw) -> list[str]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT state FROM audit WHERE event_id IS NULL ORDER BY seq").fetchall())
    return [r[0] for r in rows]


async def test_station_killed_and_restarted_gap_is_backfilled(
    station_process, erp, gateways, tmp_path
):
    port = free_port()
    args = ["--history-db", str(tmp_path / "history.db"), "--reading-period-ms", "100",
            "--result-period-ms", "600000"]
    station = await station_process(port, *args)
    node = "ns=2;s=Station7.Temperature"
    gw = await gateways(_body(station.endpoint, node, erp.url))
    await wait_connected(gw, "station7")
    await erp.wait_for(lambda r: len(events_of(r, "machine.reading")) >= 5, 30)

    await station.kill()
    killed_at = datetime.now(UTC)
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the loss to be noticed")
    await asyncio.sleep(1.0)  # the station stays down for a while (samples to recover)
    await station.start()  # same port, same history file
    await wait_connected(gw, "station7", timeout=60)

    async def gap_read_back() -> bool:
        return "backfilled" in await _audit_states(gw)  # audited after its last COMMIT

    await eventually(gap_read_back, timeout=60, what="the backfill")
    await erp.wait_for(lambda r: sum(e["backfilled"] for e in events_of(r, "machine.reading"))
                       == metric(gw.metrics.source_backfilled, "station7"), 30)
    # Live data flows on after the gap; then compare with everything the station historized.
    resumed = datetime.now(UTC)
    await erp.wait_for(lambda r: any(_dt(e["source_ts"]) > resumed
                                     for e in events_of(r, "machine.reading")), 30)
    readings = events_of(erp, "machine.reading")
    received = [_dt(e["source_ts"]) for e in readings]
    assert len(received) == len(set(received)), "a sample was stored twice"
    history = await _history(station.endpoint, node)
    window = [ts for ts in history if min(received) <= ts <= max(received)]
    missing = sorted(set(window) - set(received))
    assert not missing, f"{len(missing)} historized samples never reached the ERP: {missing[:5]}"

    recovered = [e for e in readings if e["backfilled"]]
    assert recovered, "nothing was marked backfilled"
    assert len(recovered) == metric(gw.metrics.source_backfilled, "station7")
    last_live_before = max(_dt(e["source_ts"]) for e in readings
                           if not e["backfilled"] and _dt(e["source_ts"]) < killed_at)
    assert all(_dt(e["source_ts"]) > last_live_before for e in recovered)
    assert metric(gw.metrics.source_gaps, "station7") >= 1
    states = await _audit_states(gw)
    for state in ("gap", "reconnected", "subscription_recreated", "backfilled"):
        assert state in states, f"no {state!r} row in the audit trail: {states}"


async def test_gateway_restart_backfills_from_its_watermark(opcua_station, erp, gateways,
                                                             tmp_path):
    st = await opcua_station()
    node = st.node_id("Temperature")
    state = tmp_path / "gw-state"
    gw1 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    await wait_connected(gw1, "station7")
    await st.write("Temperature", 21.0)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 21.0
                                     for e in events_of(r, "machine.reading")), 30)
    await gw1.stop()
    assert (state / "opcua" / "station7.watermarks.json").is_file()

    await st.write("Temperature", 22.0)  # while the gateway is down
    await st.write("Temperature", 22.5)
    await st.write("Temperature", 23.0)
    gw2 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    await wait_connected(gw2, "station7")
    # The end of a gap without a live sample falls back to the server's clock.
    server_now = await gw2.sources["station7"].backfill.server_time()
    assert abs((server_now - datetime.now(UTC)).total_seconds()) < 5
    await erp.wait_for(lambda r: {22.0, 22.5, 23.0} <= {e["data"]["value"] for e in
                                                       events_of(r, "machine.reading")}, 30)
    await st.write("Temperature", 24.0)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 24.0
                                     for e in events_of(r, "machine.reading")), 30)
    readings = events_of(erp, "machine.reading")
    assert [e["data"]["value"] for e in readings] == [20.0, 21.0, 23.0, 22.0, 22.5, 24.0] or \
        sorted(e["data"]["value"] for e in readings) == [20.0, 21.0, 22.0, 22.5, 23.0, 24.0]
    by_value = {e["data"]["value"]: e for e in readings}
    assert by_value[22.0]["backfilled"] and by_value[22.5]["backfilled"]
    assert not by_value[23.0]["backfilled"]  # the current value arrives live
    assert not by_value[21.0]["backfilled"] and not by_value[24.0]["backfilled"]
